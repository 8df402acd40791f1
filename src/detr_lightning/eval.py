"""``evaluate(cfg)``: COCO evaluation of a checkpoint on any data config."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from .callbacks import format_coco_table
from .data.labels import LabelMap
from .io import write_json_atomic
from .module import COCO_METRIC_KEYS, coco_metric
from .pretrained import load_pretrained
from .train import build_trainer, instantiate_data

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` (or ``cfg.pretrained``) on the validation split of ``cfg.data``.

    Writes ``metrics.json`` (torchmetrics' names of the 12 COCO statistics) and
    ``predictions.json`` (COCO results: original category ids, absolute xywh) into the run dir.
    """
    source = cfg.get("ckpt_path") or cfg.get("pretrained")
    if not source:
        raise ValueError(
            "nothing to evaluate: pass ckpt_path=PATH (a training checkpoint) or pretrained=PATH "
            "(official .pth, Hugging Face directory, or export directory)"
        )
    pl.seed_everything(cfg.seed, workers=True)
    module = load_pretrained(source)
    if cfg.get("postprocess") is not None:
        from .models.postprocess import PostProcess

        module.postprocess = PostProcess(**OmegaConf.to_container(cfg.postprocess, resolve=True))
    if cfg.get("eval_backend") and cfg.eval_backend != module.hparams.eval_backend:
        module.test_map = coco_metric(cfg.eval_backend)

    data_cfg = cfg.data
    datamodule = instantiate_data(data_cfg)
    if module.label_map is not None:
        # the model decides what its labels mean; the dataset must use the same mapping
        datamodule.use_label_map(LabelMap.from_dict(module.label_map))
    elif datamodule.num_classes > module.model.num_classes:
        raise ValueError(
            f"{source} predicts {module.model.num_classes} classes but "
            f"{datamodule.val_annotation_file} has {datamodule.num_classes}"
        )

    trainer = build_trainer(cfg)
    trainer.test(module, datamodule=datamodule)
    metrics = dict(module.last_test_metrics)
    run_dir = Path(cfg.run_dir)
    if trainer.is_global_zero:
        predictions_path = run_dir / cfg.get("predictions_file", "predictions.json")
        write_json_atomic(predictions_path, module.test_predictions)
        payload = {key: metrics[key] for key in COCO_METRIC_KEYS}
        payload.update(
            checkpoint=str(source),
            annotations=str(datamodule.val_annotation_file),
            num_images=len(datamodule.val_dataset),
            predictions=str(predictions_path),
        )
        write_json_atomic(run_dir / "metrics.json", payload)
        print(format_coco_table(metrics), flush=True)
        log.info("wrote %s and %s", run_dir / "metrics.json", predictions_path)
    return {key: metrics[key] for key in COCO_METRIC_KEYS} | {"run_dir": str(run_dir)}


def coco_eval_file(annotation_file: str | Path, predictions_file: str | Path) -> list[float]:
    """pycocotools' 12 statistics for a results file (used to cross-check ``evaluate``)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
        results = json.loads(Path(predictions_file).read_text())
        detections = ground_truth.loadRes(results) if results else COCO()
        evaluator = COCOeval(ground_truth, detections, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]
