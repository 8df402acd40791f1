"""DETR on PyTorch Lightning: the LightningModule, the data module, callbacks, loggers and
checkpoint IO. :mod:`.compat` is the one module that reads Lightning's internals."""

from .datamodule import CocoDataModule
from .module import DETRModule

__all__ = ["CocoDataModule", "DETRModule"]
