"""detr-lightning: DETR (End-to-End Object Detection with Transformers) on PyTorch Lightning.

The public API, imported on first use (``import detr_lightning`` itself loads nothing heavy):

- models: :class:`DETR`, :func:`build_detr`, :class:`Backbone`, :class:`Transformer`,
  :class:`HungarianMatcher`, :class:`SetCriterion`, :class:`PostProcess`;
- data: :class:`LabelMap`, :class:`CocoDataModule`;
- training and evaluation: :class:`DETRModule`;
- weights: :func:`load_pretrained`, :func:`save_pretrained` (``export`` is its deprecated
  name), :class:`CheckpointError`;
- inference: :class:`Predictor`; :func:`predict_sliced` with :class:`SliceSettings` (small
  objects in large images).

The package's layers and where each part lives: docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DETR": "detr_lightning.models",
    "Backbone": "detr_lightning.models",
    "Transformer": "detr_lightning.models",
    "HungarianMatcher": "detr_lightning.models",
    "SetCriterion": "detr_lightning.models",
    "PostProcess": "detr_lightning.models",
    "build_detr": "detr_lightning.models",
    "LabelMap": "detr_lightning.data.labels",
    "CocoDataModule": "detr_lightning.lightning.datamodule",
    "DETRModule": "detr_lightning.lightning.module",
    "Predictor": "detr_lightning.inference.predictor",
    "SliceSettings": "detr_lightning.inference.slicing",
    "predict_sliced": "detr_lightning.inference.slicing",
    "load_pretrained": "detr_lightning.api",
    "save_pretrained": "detr_lightning.api",
    "export": "detr_lightning.api",
    "CheckpointError": "detr_lightning.utils.errors",
    "SetupError": "detr_lightning.utils.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'detr_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
