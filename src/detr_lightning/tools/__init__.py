"""Tools around the model: the dataset check, dataset converters (YOLO, Pascal VOC -> COCO),
predictions for folders of images and the preview of the training augmentation."""
