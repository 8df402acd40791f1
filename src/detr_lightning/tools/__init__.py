"""Tools around the model: the dataset check, dataset converters (YOLO, Pascal VOC -> COCO)
and predictions for folders of images."""
