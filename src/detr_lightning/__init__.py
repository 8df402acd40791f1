"""detr-lightning: DETR (End-to-End Object Detection with Transformers) on PyTorch Lightning."""

from . import hydra_dirs  # noqa: F401  (registers the configs' ${detr.run_dir:...})
from .models import DETR, HungarianMatcher, PostProcess, SetCriterion, build_detr
from .module import DETRModule
from .pretrained import CheckpointError, export, load_pretrained

__version__ = "0.1.0"

__all__ = [
    "DETR",
    "CheckpointError",
    "DETRModule",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "__version__",
    "build_detr",
    "export",
    "load_pretrained",
]
