"""Where a dataset's files are: the ``data.root`` folder or the built-in synthetic dataset,
and split paths relative to it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..utils.errors import SetupError
from .synthetic import ensure_synthetic_coco

__all__ = ["check_data_source", "dataset_root", "split_path"]


def check_data_source(root: str | os.PathLike | None, synthetic: Mapping | None) -> None:
    """Raise SetupError unless ``root`` is a folder or ``synthetic`` parameters are given.

    Cheap, so entry points call it before any slow set-up (weights, indexing)."""
    demo = (
        "or run the CPU demo on the built-in data: detr-train experiment=synthetic_cpu "
        "(python train.py experiment=synthetic_cpu in a source checkout)"
    )
    if root is None and synthetic is None:
        raise SetupError(
            "no dataset: set data.root=/path/to/coco (a folder with train2017/, val2017/ and "
            "annotations/instances_{train,val}2017.json, or your own names through "
            f"data.train_images=... data.val_annotations=...), {demo}"
        )
    if root is not None and not Path(root).expanduser().is_dir():
        raise SetupError(
            f"data.root={root} is not a directory; point data.root at a COCO-format dataset, "
            + demo
        )


def dataset_root(root: str | os.PathLike | None, synthetic: Mapping | None) -> Path:
    """The dataset folder: ``root``, or else the synthetic dataset of the ``synthetic``
    parameters (generated into the cache once). SetupError when neither is usable."""
    check_data_source(root, synthetic)
    if root is None:
        return ensure_synthetic_coco(**synthetic)  # check_data_source: synthetic is given
    return Path(root).expanduser()


def split_path(root: Path, path: str | os.PathLike) -> Path:
    """An image directory or annotation file setting: relative to ``root`` unless absolute."""
    path = Path(path)
    return path if path.is_absolute() else root / path
