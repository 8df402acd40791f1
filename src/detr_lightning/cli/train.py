"""``detr-train`` (``python train.py``): ``train(cfg)`` builds data, model and trainer from a
Hydra config and fits; see conf/train.yaml. Tests call ``train`` with configs from Hydra's
compose API.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..data.paths import check_data_source
from ..evaluation.evaluator import resolve_backend
from ..evaluation.report import report, result_from_metrics
from ..lightning.callbacks.history import MetricsHistory
from ..lightning.callbacks.preemption import SignalStop
from ..lightning.capture import capture_settings
from ..lightning.checkpoint_io import AtomicCheckpointIO
from ..lightning.runtime import compile_model, limit_cpu_kernel_cache
from ..utils.errors import reported_as_setup_error
from .build import build_module, data_setting, ensure_backbone_weights, instantiate_data
from .config import CONFIG_PATH, upgrade_config
from .console import exit_on_setup_error, quiet_third_party
from .resume import _load_if_torch_file, _loads_in_this_process, _resume, check_resume
from .sweeps import check_optimized_metric, objective
from .trainer import build_trainer, run_callbacks

__all__ = ["train"]

log = logging.getLogger(__name__)


def train(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> dict[str, Any]:
    """Fit DETR as configured; returns the final validation metrics (+ ``run_dir``).

    ``callbacks`` are added to the configured ones (for scripts and tests). ``ckpt_path`` or
    ``resume=auto`` resume a run (:func:`resume_checkpoint`). A SIGTERM to any rank stops
    every rank after the same optimizer step, saves ``<run_dir>/checkpoints/last.ckpt`` and
    raises SystemExit(143); SLURM's requeue signal and submitit's (``hydra/launcher=slurm``) do
    the same with an ``hpc_ckpt_<n>.ckpt`` and requeue the job
    (:class:`~detr_lightning.lightning.callbacks.SignalStop`).
    """
    quiet_third_party()
    cfg = upgrade_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("cpu_threads"):
        torch.set_num_threads(int(cfg.cpu_threads))
    limit_cpu_kernel_cache(cfg.get("cpu_kernel_cache"))
    check_data_source(cfg.data.get("root"), cfg.data.get("synthetic"))
    check_optimized_metric(cfg)
    # first: it checks the devices against the processes that a launcher started
    trainer = build_trainer(cfg, run_callbacks(cfg) + list(callbacks or []))
    ensure_backbone_weights(cfg)
    run_dir = Path(cfg.run_dir)
    # The resumed checkpoint is read once: chosen and checked here, then handed to Lightning.
    ckpt_path, resumed = _resume(cfg)
    if ckpt_path and resumed is None:
        resumed = _load_if_torch_file(ckpt_path)
    with reported_as_setup_error(data_setting(cfg.data), FileNotFoundError, ValueError):
        datamodule = instantiate_data(cfg.data)
        datamodule.build_datasets("fit")
    module = build_module(cfg, datamodule)
    if ckpt_path:
        check_resume(module, ckpt_path, None if resumed is None else resumed.state)
    compile_model(module, cfg.get("compile"))
    capture_settings(cfg.get("capture"))  # a bad value fails here, before any training
    module.capture_setting = cfg.get("capture")
    checkpoint_io = trainer.strategy.checkpoint_io
    if not isinstance(checkpoint_io, AtomicCheckpointIO):
        checkpoint_io = None
    if resumed is not None and checkpoint_io is not None and _loads_in_this_process(trainer):
        checkpoint_io.hand_over(resumed)
    del resumed  # held by the checkpoint IO until Lightning takes it
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
    stop = next(c for c in trainer.callbacks if isinstance(c, SignalStop))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        # SignalStop saved the state; requeue the job if the signal asked for it, else exit
        # with 128 + 15, as a process that SIGTERM ended, so that schedulers and scripts see
        # an interrupted run, not a finished one
        stop.requeue(trainer)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if checkpoint_io is not None:  # a run that failed before its restore
            checkpoint_io.forget()
    metrics = result_from_metrics(trainer.callback_metrics, "val")
    history = next((c for c in trainer.callbacks if isinstance(c, MetricsHistory)), None)
    if cfg.get("test_after_fit") and stop.save_if_signalled(trainer):
        # signalled during the last validation: the fit is complete and now saved, and the
        # test is left for the restart (resume=auto finds the fit done and runs the test)
        if trainer.is_global_zero:
            log.warning("the fit is complete; test_after_fit is left for the restart")
        stop.requeue(trainer)
        raise SystemExit(128 + signal.SIGTERM)
    if cfg.get("test_after_fit"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", None) or None
        (logged,) = trainer.test(
            module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True
        )
        metrics = result_from_metrics(logged, "test")
        if trainer.is_global_zero and history:
            history.final_metrics = metrics
            history.write(module.label_map)
    if trainer.is_global_zero and metrics:
        log.info(
            "final validation (COCO, %s):\n%s",
            resolve_backend(cfg.eval_backend),
            report(metrics, module.label_map),
        )
    return metrics | {"run_dir": str(run_dir)}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``detr-train``: returns ``optimized_metric``'s value (or None) for sweepers (Optuna)."""
    return objective(cfg, exit_on_setup_error(train, cfg))


if __name__ == "__main__":
    main()
