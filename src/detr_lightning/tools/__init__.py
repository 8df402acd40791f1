"""Tools around the model: the dataset check and predictions for folders of images."""
