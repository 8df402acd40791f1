"""``train(cfg)``: build data, model and trainer from a Hydra config and fit.

The thin ``train.py`` at the repository root wraps this with ``@hydra.main``; tests call it
with configs from Hydra's compose API.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .callbacks import MetricsHistory, format_coco_table
from .module import COCO_METRIC_KEYS, DETRModule
from .pretrained import load_state_into, read_checkpoint

log = logging.getLogger(__name__)


def instantiate_data(node: DictConfig) -> Any:
    """Instantiate the data module; its own errors (missing files, bad annotations) surface as
    they are instead of wrapped in Hydra's InstantiationException."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, (OSError, ValueError)):
            raise err.__cause__ from None
        raise


def model_settings(cfg: DictConfig, num_classes: int | None) -> dict[str, Any]:
    """``build_detr`` keyword arguments from the ``model`` and ``backbone`` config groups."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    backbone = cfg.backbone
    if model.get("num_classes") is None:
        if num_classes is None:
            raise ValueError("model.num_classes is null and no dataset tells the class count")
        model["num_classes"] = num_classes
    model.update(
        backbone=backbone.name,
        dilation=bool(backbone.dilation),
        pretrained_backbone=bool(backbone.pretrained),
        norm=backbone.norm,
        train_backbone=float(backbone.lr) > 0,
        trainable_layers=int(backbone.get("trainable_layers", 3)),
        num_stages=int(backbone.get("num_stages", 4)),
    )
    return model


def build_module(cfg: DictConfig, datamodule: Any) -> DETRModule:
    """The DETRModule of a training config, initialized from ``cfg.pretrained`` if set."""
    label_map = datamodule.label_map
    label_map = label_map.to_dict() if hasattr(label_map, "to_dict") else label_map
    model = model_settings(cfg, datamodule.num_classes)
    if model["num_classes"] < datamodule.num_classes:
        unknown = datamodule.label_map.category_ids[model["num_classes"] :]
        raise ValueError(
            f"{datamodule.val_annotation_file} has {datamodule.num_classes} classes but "
            f"model.num_classes={model['num_classes']}: category ids {unknown} would be unknown "
            f"to the model. Set model.num_classes={datamodule.num_classes} or null (= from the "
            "dataset); with pretrained=... the class head is re-initialized."
        )
    if cfg.get("pretrained") and model.get("pretrained_backbone"):
        log.info("pretrained=%s given: not downloading ImageNet backbone weights", cfg.pretrained)
        model["pretrained_backbone"] = False
    module = DETRModule(
        model=model,
        loss=cfg.loss,
        optimizer=cfg.optimizer,
        backbone_lr=float(cfg.backbone.lr),
        schedule=cfg.schedule,
        postprocess=cfg.get("postprocess"),
        label_map=label_map,
        eval_backend=cfg.get("eval_backend", "pycocotools"),
    )
    if cfg.get("pretrained"):
        info = read_checkpoint(cfg.pretrained)
        reinit = info["model"]["num_classes"] != model["num_classes"]
        if reinit:
            log.info(
                "%s has %d classes, the dataset %d: re-initializing the class head",
                cfg.pretrained,
                info["model"]["num_classes"],
                model["num_classes"],
            )
        load_state_into(module.model, info["state_dict"], info["path"], reinit_class_head=reinit)
        log.info("initialized from %s (%s format)", cfg.pretrained, info["format"])
    return module


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [
        instantiate(value) for value in node.values() if value is not None and "_target_" in value
    ]


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    loggers = _instantiate_dict(cfg.get("logger"))
    all_callbacks = _instantiate_dict(cfg.get("callbacks")) + list(callbacks or [])
    return instantiate(
        cfg.trainer,
        callbacks=all_callbacks,
        logger=loggers or False,
        default_root_dir=cfg.run_dir,
    )


def train(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Fit DETR as configured; returns the final validation metrics (+ ``run_dir``).

    ``callbacks`` are added to the configured ones (for scripts and tests).
    """
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    run_dir = Path(cfg.run_dir)
    datamodule = instantiate_data(cfg.data)
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, callbacks)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        parameters = sum(p.numel() for p in module.model.parameters())
        log.info(
            "DETR %s: %.2fM parameters, %d classes, run dir %s",
            cfg.backbone.name,
            parameters / 1e6,
            module.model.num_classes,
            run_dir,
        )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    history = next((c for c in trainer.callbacks if isinstance(c, MetricsHistory)), None)
    metrics = (
        dict(history.final_metrics) if history else dict(getattr(module, "last_val_metrics", {}))
    )
    if cfg.get("test_after_fit"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", None) or None
        trainer.test(module, datamodule=datamodule, ckpt_path=best)
        metrics = dict(module.last_test_metrics)
        if trainer.is_global_zero and history:
            history.final_metrics = metrics
            history.write()
    if trainer.is_global_zero and metrics:
        log.info(
            "final validation metrics (COCO, %s):\n%s",
            cfg.get("eval_backend"),
            format_coco_table(metrics),
        )
    return {key: metrics.get(key) for key in COCO_METRIC_KEYS} | {"run_dir": str(run_dir)}


__all__ = ["build_module", "build_trainer", "instantiate_data", "model_settings", "train"]
