"""Data pipeline in plain PyTorch: COCO-format datasets, DETR augmentations, label maps,
batching and the resumable sampler (the Lightning data module is
:class:`detr_lightning.lightning.CocoDataModule`)."""

from .coco import CocoDetection, load_coco_json
from .collate import collate_detection
from .labels import LabelMap
from .presets import make_train_transforms, make_val_transforms
from .synthetic import ensure_synthetic_coco, generate_synthetic_coco

__all__ = [
    "CocoDetection",
    "LabelMap",
    "collate_detection",
    "ensure_synthetic_coco",
    "generate_synthetic_coco",
    "load_coco_json",
    "make_train_transforms",
    "make_val_transforms",
]
