"""``detr-validate data.root=/data/mydataset`` (or ``python -m detr_lightning.cli.validate``):
check a COCO-format dataset before training.

The arguments are train.py's Hydra overrides: ``conf/validate.yaml`` composes
``conf/train.yaml``, so ``data.*`` paths, ``data=synthetic``, ``experiment=finetune_custom``,
``model.num_queries``, ``pretrained`` and ``data.strict`` mean what they mean for training, and
the advice weighs the data against the batch size, queries and epochs of that run. Prints the
report of :func:`~detr_lightning.tools.dataset_check.check_dataset` (both splits).

Exit status: 0 without errors (warnings allowed), 1 when the dataset has errors, 2 when the
check cannot run (no dataset given, a bad override).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..data.paths import dataset_root, split_path
from ..tools.dataset_check import DatasetReport, TrainingPlan, check_dataset, format_report
from ..utils.errors import SetupError
from .config import compose_config

__all__ = ["main", "training_plan", "validate"]


def training_plan(cfg: DictConfig) -> TrainingPlan:
    """The settings of the training run that ``cfg`` (a train.yaml composition) describes."""
    return TrainingPlan(
        batch_size=int(cfg.data.batch_size),
        num_queries=int(cfg.model.num_queries),
        max_epochs=OmegaConf.select(cfg, "trainer.max_epochs", default=None),
        pretrained=OmegaConf.select(cfg, "pretrained", default=None),
        label_mapping=str(cfg.data.label_mapping),
        strict=bool(cfg.data.strict),
        val_size=int(cfg.data.val_size),
        max_size=int(cfg.data.max_size),
        lr_drop="lr_drop" in (OmegaConf.select(cfg, "schedule", default=None) or {}),
    )


def validate(cfg: DictConfig, *, progress: bool = False) -> DatasetReport:
    """Report of the dataset that ``cfg.data`` points at (SetupError when it names none)."""
    pretrained = OmegaConf.select(cfg, "pretrained", default=None)
    if pretrained and not Path(str(pretrained)).expanduser().exists():
        raise SetupError(f"pretrained={pretrained}: no such file or directory; check the path")
    data = cfg.data
    synthetic = data.get("synthetic")
    if synthetic is not None:
        synthetic = OmegaConf.to_container(synthetic, resolve=True)
    root = dataset_root(data.get("root"), synthetic)
    return check_dataset(
        (split_path(root, data.train_images), split_path(root, data.train_annotations)),
        (split_path(root, data.val_images), split_path(root, data.val_annotations)),
        plan=training_plan(cfg),
        decode=bool(cfg.decode),
        decode_workers=cfg.get("decode_workers"),
        progress=progress,
    )


# ----------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the report; return the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="detr-validate",
        description="Check a COCO-format dataset (both splits) before training DETR on it.",
        epilog="Exit status: 0 no errors (warnings allowed), 1 errors found, 2 could not run. "
        "Example: detr-validate data.root=/data/parts data.train_images=images/train "
        "data.train_annotations=train.json experiment=finetune_custom",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="detr-train's overrides: data.root=..., data.val_annotations=..., decode=false, "
        "max_examples=20, ...",
    )
    parser.add_argument(
        "--no-decode", action="store_true", help="skip decoding the images (decode=false)"
    )
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *(["decode=false"] if args.no_decode else [])]
    try:
        cfg = compose_config("validate", overrides)
        report = validate(cfg, progress=True)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report, max_examples=int(cfg.max_examples)), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
