"""``evaluate(cfg)``: COCO evaluation of a checkpoint or export.

Only what evaluation needs is built: the model from the checkpoint, the validation split and a
trainer. The split, its preprocessing (``val_size``, ``max_size``), batch size and label map
default to what the checkpoint stores from its training run, so ``eval.py ckpt_path=...``
repeats the run's validation with no other argument; each non-null ``data.*`` key of the
config overrides the stored value; ``batch_invariant`` (null: as trained) sets
:attr:`DETR.batch_invariant`. Official and Hugging Face checkpoints store no data
settings: they need ``data.root`` and take the paper's preprocessing (800 / 1333).

Beside the COCO metrics, the detection confusion matrix of the same predictions
(:mod:`detr_lightning.evaluation.confusion`, thresholds under ``confusion.*``) is written as
JSON and as a heat map.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ..api import load_pretrained
from ..data.coco import load_coco_json
from ..evaluation.confusion import ConfusionMatrix, confusion_from_coco
from ..evaluation.evaluator import coco_eval_file
from ..evaluation.report import metrics_payload, report, result_from_metrics
from ..lightning.callbacks.memory import ReuseFreedMemory
from ..lightning.datamodule import CocoDataModule
from ..lightning.specs import build, plain
from ..utils import host_memory
from ..utils.errors import CheckpointError, SetupError, reported_as_setup_error
from ..utils.io import write_json_atomic
from ..viz.confusion_figure import plot_confusion_matrix
from .build import data_setting
from .config import CONFIG_PATH, upgrade_config
from .console import exit_on_setup_error, quiet_third_party
from .trainer import build_trainer

log = logging.getLogger(__name__)

# CocoDataModule arguments that evaluation uses; the eval config's data node has these keys.
EVAL_DATA_KEYS = ("root", "synthetic", "val_images", "val_annotations", "val_size", "max_size",
                  "val_batch_size", "label_mapping", "num_workers", "strict", "pad_to")  # fmt: skip


def evaluation_data(stored: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> dict:
    """CocoDataModule arguments: the checkpoint's stored settings, then non-null overrides."""
    # training-only keys (a data=coco group brings them along) are not evaluation settings
    settings = {k: v for k, v in (stored or {}).items() if k in EVAL_DATA_KEYS}
    settings.update({k: v for k, v in overrides.items() if v is not None and k in EVAL_DATA_KEYS})
    if settings.get("root") is None and settings.get("synthetic") is None:
        raise SetupError(
            "the checkpoint stores no dataset to evaluate on (official and Hugging Face weights "
            "do not): set data.root=/path/to/coco, and data.val_images=... / "
            "data.val_annotations=... for other layouts"
        )
    if settings.get("root") is not None:
        settings["synthetic"] = None
    return settings


def confusion_settings(cfg: DictConfig) -> dict[str, float] | None:
    """The given ``confusion.score_threshold`` / ``confusion.iou_threshold``, checked before
    the evaluation runs; None when ``confusion=null`` (no matrix is written)."""
    node = cfg.get("confusion")
    if node is None:
        return None
    keys = ("score_threshold", "iou_threshold")
    with reported_as_setup_error(f"confusion={plain(node)}", ValueError, TypeError):
        settings = {key: float(node[key]) for key in keys if node.get(key) is not None}
        ConfusionMatrix([], **settings)  # raises on a threshold out of range
    return settings


def write_confusion_matrix(
    run_dir: Path,
    annotation_file: str | Path,
    predictions_file: str | Path,
    image_ids: list[int] | None,
    settings: Mapping[str, float],
) -> ConfusionMatrix:
    """``confusion_matrix.json`` and ``confusion_matrix.png`` in ``run_dir``, from the written
    (gathered, de-duplicated) COCO results and the annotation file of the evaluation."""
    matrix = confusion_from_coco(
        load_coco_json(annotation_file),
        json.loads(Path(predictions_file).read_text()),
        image_ids=image_ids,
        **settings,
    )
    matrix.write_json(run_dir / "confusion_matrix.json")
    title = (
        f"confusion matrix: score >= {matrix.score_threshold:g}, IoU >= "
        f"{matrix.iou_threshold:g}, {matrix.num_images} images"
    )
    plot_confusion_matrix(matrix.counts, matrix.labels, run_dir / "confusion_matrix.png",
                          title=title)  # fmt: skip
    return matrix


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` (or ``cfg.pretrained``) on a COCO-format validation split.

    Writes into the run dir ``metrics.json`` (the 12 COCO statistics under torchmetrics'
    names, per-class AP, image counts, the data settings used), ``predictions.json`` (COCO
    results: dataset category ids, absolute xywh) and, unless ``confusion=null``,
    ``confusion_matrix.json`` / ``.png`` (see :func:`write_confusion_matrix`), and prints the
    tables.
    """
    source = cfg.get("ckpt_path") or cfg.get("pretrained")
    if not source:
        raise SetupError(
            "nothing to evaluate: pass ckpt_path=PATH (a training checkpoint) or pretrained=PATH "
            "(official .pth, Hugging Face directory, or export directory)"
        )
    # a config from before the key leaves malloc alone
    reuse = host_memory.reuse_setting(cfg.get("reuse_freed_memory", False))
    confusion = confusion_settings(cfg)
    quiet_third_party()
    cfg = upgrade_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    # first: it checks the devices against the processes that a launcher started
    trainer = build_trainer(cfg, [ReuseFreedMemory()] if reuse else [], stage="test")
    key = "ckpt_path" if cfg.get("ckpt_path") else "pretrained"
    with reported_as_setup_error(f"{key}={source}", CheckpointError, FileNotFoundError):
        module = load_pretrained(source)
    if cfg.get("postprocess") is not None:  # given keys over the checkpoint's settings
        module.postprocess = build({**module.hparams["postprocess"], **plain(cfg.postprocess)})
    if cfg.get("eval_backend"):
        module.hparams.eval_backend = cfg.eval_backend
    if cfg.get("batch_invariant") is not None:
        module.model.batch_invariant = bool(cfg.batch_invariant)

    overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    data = evaluation_data(module.hparams.get("data"), overrides)
    with reported_as_setup_error(data_setting(data), FileNotFoundError, ValueError):
        datamodule = CocoDataModule(**data, seed=cfg.seed)
        datamodule.build_datasets("test")
    if module.label_map is None and datamodule.num_classes > module.model.num_classes:
        raise SetupError(
            f"{source} predicts {module.model.num_classes} classes but "
            f"{datamodule.val_annotation_file} has {datamodule.num_classes}"
        )

    run_dir = Path(cfg.run_dir)
    predictions_path = run_dir / cfg.predictions_file
    module.results_file = str(predictions_path)
    (logged,) = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = result_from_metrics(logged, "test")
    if trainer.is_global_zero:
        payload = metrics_payload(metrics, module.label_map)
        payload.update(
            checkpoint=str(source),
            annotations=str(datamodule.val_annotation_file),
            predictions=str(predictions_path),
            data=data,
            batch_invariant=module.model.batch_invariant,
        )
        write_json_atomic(run_dir / "metrics.json", payload)
        print(report(metrics, module.label_map), flush=True)
        log.info("wrote %s and %s", run_dir / "metrics.json", predictions_path)
        if confusion is not None:
            write_confusion_matrix(run_dir, datamodule.val_annotation_file, predictions_path,
                                   module.evaluation_result.image_ids, confusion)  # fmt: skip
            log.info("wrote %s and %s", run_dir / "confusion_matrix.json",
                     run_dir / "confusion_matrix.png")  # fmt: skip
    return metrics | {"run_dir": str(run_dir)}


__all__ = [
    "coco_eval_file",
    "confusion_settings",
    "evaluate",
    "evaluation_data",
    "write_confusion_matrix",
]


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    """``detr-eval``"""
    exit_on_setup_error(evaluate, cfg)


if __name__ == "__main__":
    main()
