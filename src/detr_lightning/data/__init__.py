"""Data pipeline: COCO-format datasets, DETR augmentations, batching and the data module."""

from detr_lightning.data.coco import CocoDetection, load_coco_json
from detr_lightning.data.collate import collate_detection
from detr_lightning.data.datamodule import CocoDataModule
from detr_lightning.data.labels import LabelMap
from detr_lightning.data.presets import make_train_transforms, make_val_transforms
from detr_lightning.data.synthetic import ensure_synthetic_coco, generate_synthetic_coco

__all__ = [
    "CocoDataModule",
    "CocoDetection",
    "LabelMap",
    "collate_detection",
    "ensure_synthetic_coco",
    "generate_synthetic_coco",
    "load_coco_json",
    "make_train_transforms",
    "make_val_transforms",
]
