"""``detr-convert format=yolo input=/data/yolo output=/data/coco`` (or ``python -m
detr_lightning.cli.convert``): a YOLO or Pascal VOC dataset as a COCO-format one that
``data.root=`` reads.

The arguments are Hydra overrides of ``conf/convert.yaml``, whose comments list every option.
Prints the conversion summary of :mod:`detr_lightning.tools.converters` (images and objects per
split, what was left out and why), then with ``check=true`` the report of the dataset check
(:func:`~detr_lightning.tools.dataset_check.check_dataset`, what ``detr-validate`` prints).

Exit status: 0 converted and checked without errors (or ``check=false``), 1 converted but the
check found errors, 2 nothing converted (bad input or options; the message names the file and
the fix).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from ..tools.converters import (
    ConversionSummary,
    convert_voc,
    convert_yolo,
    format_summary,
    read_class_names,
)
from ..tools.dataset_check import DatasetReport, check_dataset, format_report
from ..utils.errors import SetupError
from .config import compose_config

__all__ = ["check_output", "convert", "main"]

FORMATS = ("yolo", "voc")


def _classes(value: Any) -> list[str] | None:
    """``classes=``: a list of names, or a text file with one name a line."""
    if value is None:
        return None
    if isinstance(value, ListConfig | list | tuple):
        return [str(name) for name in value]
    return read_class_names(Path(str(value)))


def convert(cfg: DictConfig, *, progress: bool = False) -> ConversionSummary:
    """Convert the dataset that ``cfg`` (a conf/convert.yaml composition) describes; bad input
    or options raise SetupError."""
    fmt = str(cfg.format or "").lower()
    if fmt not in FORMATS:
        raise SetupError(f"format={cfg.format}: choose format=yolo or format=voc")
    if cfg.input is None or cfg.output is None:
        raise SetupError(
            "name the source and the new dataset folder: detr-convert format=... input=DIR "
            "output=DIR"
        )
    val_fraction = cfg.val_fraction
    common: dict[str, Any] = {
        "val_fraction": None if val_fraction is None else float(val_fraction),
        "seed": int(cfg.seed),
        "copy_images": bool(cfg.copy_images),
        "overwrite": bool(cfg.overwrite),
        "progress": progress,
    }
    try:
        common["classes"] = _classes(cfg.classes)
        if fmt == "yolo":
            return convert_yolo(cfg.input, cfg.output, **common)
        return convert_voc(
            cfg.input,
            cfg.output,
            difficult=str(cfg.voc_difficult),
            coordinates=str(cfg.voc_coordinates),
            unknown_classes=str(cfg.voc_unknown_classes),
            train_set=str(cfg.voc_train_set),
            val_set=str(cfg.voc_val_set),
            **common,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        raise SetupError(str(err)) from None


def check_output(
    summary: ConversionSummary, *, decode: bool = True, progress: bool = False
) -> DatasetReport:
    """The dataset check of the converted output (both splits, contiguous labels)."""
    return check_dataset(
        summary.paths("train"), summary.paths("val"), decode=decode, progress=progress
    )


# ----------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: convert, print the summary and the check; return the exit status (see
    the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="detr-convert",
        description="Convert a YOLO or Pascal VOC detection dataset into the COCO layout "
        "that detr-train data.root=... reads, then check it.",
        epilog="Exit status: 0 converted and checked, 1 the check found errors, 2 nothing "
        "converted. Example: detr-convert format=voc input=VOCdevkit/VOC2012 output=voc-coco "
        "voc_difficult=skip",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="conf/convert.yaml's keys: format=yolo|voc input=DIR output=DIR val_fraction=0.1 "
        "seed=0 copy_images=true overwrite=false check=true ...",
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = compose_config("convert", args.overrides)
        summary = convert(cfg, progress=True)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary, max_examples=int(cfg.max_examples)), flush=True)
    if not cfg.check:
        return 0
    report = check_output(summary, decode=bool(cfg.decode), progress=True)
    print(f"\ncheck of {summary.output} (detr-validate data.root={summary.output}):")
    print(format_report(report, max_examples=int(cfg.max_examples)), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
