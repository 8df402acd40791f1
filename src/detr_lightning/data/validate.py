"""Check a COCO-format dataset before training: ``python -m detr_lightning.data.validate
data.root=/data/mydataset`` (also installed as ``detr-validate``).

The arguments are train.py's Hydra overrides: ``conf/validate.yaml`` composes
``conf/train.yaml``, so ``data.*`` paths, ``data=synthetic``, ``experiment=finetune_custom``,
``model.num_queries``, ``pretrained`` and ``data.strict`` mean what they mean for training, and
the advice weighs the data against the batch size, queries and epochs of that run. Prints the
report of :func:`~detr_lightning.data.report.check_dataset` (both splits).

Exit status: 0 without errors (warnings allowed), 1 when the dataset has errors, 2 when the
check cannot run (no dataset given, a bad override).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detr_lightning.data.annotations import LARGE_AREA, SMALL_AREA
from detr_lightning.data.datamodule import dataset_root, split_path
from detr_lightning.data.report import (
    ERROR,
    INFO,
    SEVERITIES,
    WARNING,
    DatasetReport,
    SplitReport,
    TrainingPlan,
    check_dataset,
    plural,
)
from detr_lightning.errors import SetupError

__all__ = ["compose_config", "format_report", "main", "training_plan", "validate"]

CONFIG_NAME = "validate"


def _conf_dir() -> Path:
    """The project's conf/: beside the source tree (a checkout), or in the working directory."""
    candidates = list(
        dict.fromkeys([Path(__file__).resolve().parents[3] / "conf", Path.cwd() / "conf"])
    )
    for candidate in candidates:
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise SetupError(
        f"conf/{CONFIG_NAME}.yaml not found (looked in {', '.join(map(str, candidates))}); run "
        "from a detr-lightning checkout (pip install -e .) or from its root directory"
    )


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/validate.yaml`` with Hydra ``overrides``; bad overrides raise SetupError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(_conf_dir()), version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except HydraException as err:
        raise SetupError(str(err)) from None


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


# ------------------------------------------------------------------------------ printing
_SEVERITY_TITLES = {ERROR: "error", WARNING: "warning", INFO: "note"}
_SIZE_NAMES = {
    "small": f"small (< {math.isqrt(SMALL_AREA)}^2)",
    "medium": "medium",
    "large": f"large (> {math.isqrt(LARGE_AREA)}^2)",
}
HISTOGRAM_WIDTH = 20  # characters of the longest bar


def _split_lines(split: SplitReport) -> list[str]:
    lines = [f"{split.name}: {split.image_dir}  +  {split.annotation_file}"]
    scan = split.scan
    if scan is None:
        return [*lines, "  (annotation file not readable)"]
    per_image = scan.objects_per_image
    mean = float(per_image.mean()) if len(per_image) else 0.0
    lines.append(
        f"  {scan.num_images} images ({len(scan.images_without_annotations())} without "
        f"annotations), {scan.num_annotations} annotations ({scan.num_crowd} crowd), "
        f"{scan.num_objects} objects; per image mean {mean:.1f}, max "
        f"{int(per_image.max(initial=0))}; images "
        + ("decoded" if split.decoded else "not decoded (decode=false)")
    )
    width = max([len(f"{c} {n}") for c, n in scan.categories.items()] + [26])
    if scan.categories:
        most = max(scan.instances.values(), default=0) or 1
        lines.append(f"  {'category':<{width}}  {'objects':>8}  {'images':>7}")
        for cat_id in sorted(scan.categories):
            label = f"{cat_id} {scan.categories[cat_id]}"
            count = scan.instances[cat_id]
            bar = "#" * math.ceil(HISTOGRAM_WIDTH * count / most)
            images = scan.images_per_category[cat_id]
            lines.append(f"  {label:<{width}}  {count:>8}  {images:>7}  {bar}".rstrip())
    sizes = scan.size_counts()
    total = sum(sizes.values())
    if total:
        lines.append(f"  {'box area (px, COCO ranges)':<{width}}  {'objects':>8}")
        for key, count in sizes.items():
            bar = "#" * math.ceil(HISTOGRAM_WIDTH * count / max(sizes.values()))
            share = f"{count / total:.0%}"
            lines.append(f"  {_SIZE_NAMES[key]:<{width}}  {count:>8}  {share:>7}  {bar}".rstrip())
    return lines


def format_report(report: DatasetReport, max_examples: int = 10) -> str:
    """The report as text: per split its numbers and histograms (objects and images per
    category, objects per COCO size range), then the findings (each with its first
    ``max_examples`` items and the count of the rest), the advice and the verdict."""
    lines: list[str] = []
    for split in report.splits:
        lines += [*_split_lines(split), ""]
    findings = report.findings
    if findings:
        lines.append("findings:")
        for finding in findings:
            where = f"[{finding.split}] " if finding.split else ""
            title = _SEVERITY_TITLES[finding.severity]
            lines.append(f"  {title:<7} {where}{len(finding.items)} x {finding.message}")
            lines += [f"            {item}" for item in finding.items[:max_examples]]
            if len(finding.items) > max_examples:
                lines.append(f"            ... and {len(finding.items) - max_examples} more")
        lines.append("")
    if report.advice:
        lines += ["advice:", *(f"  - {text}" for text in report.advice), ""]
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    lines.append(
        f"{'FAILED' if counts[ERROR] else 'OK'}: {plural(counts[ERROR], 'error')}, "
        f"{plural(counts[WARNING], 'warning')}, {plural(counts[INFO], 'note')}"
    )
    return "\n".join(lines)


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
        help="train.py overrides: data.root=..., data.val_annotations=..., decode=false, "
        "max_examples=20, ...",
    )
    parser.add_argument(
        "--no-decode", action="store_true", help="skip decoding the images (decode=false)"
    )
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *(["decode=false"] if args.no_decode else [])]
    try:
        cfg = compose_config(overrides)
        report = validate(cfg, progress=True)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report, max_examples=int(cfg.max_examples)), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
