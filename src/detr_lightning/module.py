"""DETRModule: the LightningModule that trains, validates and runs DETR.

All settings are plain dicts saved as hyper-parameters, so a checkpoint rebuilds its module
with ``DETRModule.load_from_checkpoint(path)`` and no config. The label map saved with them
maps the model's contiguous labels back to the dataset's category ids and names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from .io import to_plain
from .models.criterion import SetCriterion
from .models.detr import build_detr
from .models.matcher import HungarianMatcher
from .models.postprocess import PostProcess
from .ops.boxes import box_cxcywh_to_xyxy
from .ops.distributed import all_gather_list

LOSS_DEFAULTS = {
    "set_cost_class": 1.0,
    "set_cost_bbox": 5.0,
    "set_cost_giou": 2.0,
    "ce_loss_coef": 1.0,
    "bbox_loss_coef": 5.0,
    "giou_loss_coef": 2.0,
    "eos_coef": 0.1,
}
OPTIMIZER_DEFAULTS = {
    "_target_": "torch.optim.AdamW",
    "_partial_": True,
    "lr": 1e-4,
    "weight_decay": 1e-4,
}
SCHEDULE_DEFAULTS = {
    "name": "step",  # "step": x gamma every lr_drop epochs (official); "cosine": per step
    "lr_drop": 200,
    "gamma": 0.1,
    "warmup_steps": 0,
    "min_lr_ratio": 0.0,
}
POSTPROCESS_DEFAULTS = {"score_threshold": 0.0, "top_k": None}
# torchmetrics' names of the 12 COCO statistics, in COCOeval's order.
COCO_METRIC_KEYS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
LOSS_LOG_KEYS = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")


def _merged(defaults: Mapping[str, Any], given: Mapping[str, Any] | None, what: str) -> dict:
    given = to_plain(given) or {}
    unknown = sorted(set(given) - set(defaults)) if not what.startswith("optimizer") else []
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


class DETRModule(pl.LightningModule):
    """DETR with its matcher, set criterion, post-processing, optimizer and COCO metrics.

    Args:
        model: keyword arguments of :func:`detr_lightning.models.build_detr`.
        loss: matching costs and loss weights (keys of ``LOSS_DEFAULTS``).
        optimizer: a Hydra ``_partial_`` spec of the optimizer (default AdamW lr 1e-4, wd 1e-4);
            completed in :meth:`configure_optimizers` with the parameter groups.
        backbone_lr: learning rate of the (trainable part of the) backbone.
        schedule: learning-rate schedule (keys of ``SCHEDULE_DEFAULTS``).
        postprocess: ``score_threshold`` and ``top_k`` of :class:`PostProcess`.
        label_map: ``{"category_ids": [...], "names": [...]}``, one entry per contiguous label.
        eval_backend: torchmetrics' COCO backend, "pycocotools" or "faster_coco_eval".
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        backbone_lr: float = 1e-5,
        schedule: Mapping[str, Any] | None = None,
        postprocess: Mapping[str, Any] | None = None,
        label_map: Mapping[str, Any] | None = None,
        eval_backend: str = "pycocotools",
    ) -> None:
        super().__init__()
        model = to_plain(model)
        loss = _merged(LOSS_DEFAULTS, loss, "loss")
        optimizer = _merged(OPTIMIZER_DEFAULTS, optimizer, "optimizer")
        schedule = _merged(SCHEDULE_DEFAULTS, schedule, "schedule")
        postprocess = _merged(POSTPROCESS_DEFAULTS, postprocess, "postprocess")
        label_map = to_plain(label_map)
        self.save_hyperparameters(
            {
                # A rebuilt module gets every backbone weight from its checkpoint: it must not
                # download ImageNet weights again.
                "model": {**model, "pretrained_backbone": False},
                "loss": loss,
                "optimizer": optimizer,
                "backbone_lr": backbone_lr,
                "schedule": schedule,
                "postprocess": postprocess,
                "label_map": label_map,
                "eval_backend": eval_backend,
            }
        )
        self.model = build_detr(**model)
        num_classes = self.model.num_classes
        if label_map is not None and len(label_map["category_ids"]) > num_classes:
            raise ValueError(
                f"label map has {len(label_map['category_ids'])} classes but the model only "
                f"{num_classes}; set model.num_classes >= {len(label_map['category_ids'])}"
            )
        self.criterion = SetCriterion(
            num_classes,
            HungarianMatcher(loss["set_cost_class"], loss["set_cost_bbox"], loss["set_cost_giou"]),
            eos_coef=loss["eos_coef"],
            ce_loss_coef=loss["ce_loss_coef"],
            bbox_loss_coef=loss["bbox_loss_coef"],
            giou_loss_coef=loss["giou_loss_coef"],
            num_decoder_layers=len(self.model.transformer.decoder.layers),
            aux_loss=self.model.aux_loss,
        )
        self.postprocess = PostProcess(**postprocess)
        self.val_map = coco_metric(eval_backend)
        self.test_map = coco_metric(eval_backend)

    # ------------------------------------------------------------------------------ inference
    def forward(self, images: Tensor | Sequence[Tensor], padding_mask: Tensor | None = None):
        """Raw predictions; see :meth:`detr_lightning.models.DETR.forward`."""
        return self.model(images, padding_mask)

    @property
    def label_map(self) -> dict[str, list] | None:
        return self.hparams.get("label_map")

    @property
    def class_names(self) -> list[str]:
        label_map = self.label_map
        if label_map is None:
            return [f"class_{i}" for i in range(self.model.num_classes)]
        return list(label_map["names"])

    # ------------------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes > self.model.num_classes:
            raise ValueError(
                f"the dataset has {data_classes} classes (label map of "
                f"{getattr(datamodule, 'val_annotation_file', 'the data module')}) but the model "
                f"predicts {self.model.num_classes}: category ids beyond the model are unknown to "
                f"it. Set model.num_classes={data_classes} (with pretrained=... the class head "
                "is re-initialized)."
            )
        if self.label_map is None and datamodule is not None and hasattr(datamodule, "label_map"):
            label_map = datamodule.label_map
            self.hparams["label_map"] = (
                label_map.to_dict() if hasattr(label_map, "to_dict") else to_plain(label_map)
            )

    def _losses(self, batch) -> tuple[Tensor, dict[str, Tensor], dict]:
        images, padding_mask, targets = batch
        outputs = self.model(images, padding_mask)
        losses = self.criterion(outputs, [_without_crowd(t) for t in targets])
        return self.criterion.weighted_total(losses), losses, outputs

    def training_step(self, batch, batch_idx: int) -> Tensor | None:
        if batch is None:  # every image of the batch was unreadable (logged by the dataset)
            return None
        total, losses, _ = self._losses(batch)
        batch_size = len(batch[2])
        # The step value is this rank's; the epoch values are averaged over ranks once.
        self.log("train/loss_step", total, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch_size)  # fmt: skip
        self.log("train/loss", total, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=batch_size)  # fmt: skip
        self.log_dict(
            {f"train/{k}": v for k, v in losses.items()},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch_size,
        )
        return total

    def _eval_step(self, batch, metric: MeanAveragePrecision, prefix: str) -> None:
        if batch is None:
            return
        images, _, targets = batch
        total, losses, outputs = self._losses(batch)
        batch_size = len(targets)
        self.log(f"{prefix}/loss", total, on_epoch=True, sync_dist=True, batch_size=batch_size)
        self.log_dict(
            {f"{prefix}/{k}": losses[k] for k in LOSS_LOG_KEYS if k in losses},
            on_epoch=True,
            sync_dist=True,
            batch_size=batch_size,
        )
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = self.postprocess(outputs, orig_sizes)
        metric.update(detections, _metric_targets(targets, orig_sizes))
        if prefix == "test":
            self.test_predictions.extend(self.coco_results(targets, detections))

    def coco_results(
        self, targets: Sequence[dict[str, Any]], detections: Sequence[dict[str, Tensor]]
    ) -> list[dict[str, Any]]:
        """Detections in COCO's results format: dataset category ids, absolute xywh boxes."""
        label_map = self.label_map
        category_ids = label_map["category_ids"] if label_map is not None else None
        results = []
        for target, det in zip(targets, detections):
            boxes = det["boxes"].cpu().clone()
            boxes[:, 2:] -= boxes[:, :2]
            for box, score, label in zip(
                boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()
            ):
                results.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": int(category_ids[label] if category_ids else label),
                        "bbox": box,
                        "score": float(score),
                    }
                )
        return results

    def _eval_epoch_end(self, metric: MeanAveragePrecision, prefix: str) -> dict[str, float]:
        results = metric.compute()
        metric.reset()
        stats = {key: float(results[key]) for key in COCO_METRIC_KEYS}
        for key, value in stats.items():
            self.log(f"{prefix}/{key}", value, prog_bar=key in ("map", "map_50"), sync_dist=False)
        return stats

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_map, "val")

    def on_validation_epoch_end(self) -> None:
        self.last_val_metrics = self._eval_epoch_end(self.val_map, "val")

    def on_test_epoch_start(self) -> None:
        self.test_predictions: list[dict[str, Any]] = []

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_map, "test")

    def on_test_epoch_end(self) -> None:
        self.last_test_metrics = self._eval_epoch_end(self.test_map, "test")
        # every rank evaluated a shard; the predictions file needs all of them
        self.test_predictions = all_gather_list(self.test_predictions)

    def predict_step(self, batch, batch_idx: int) -> list[dict[str, Any]]:
        """Detections in original image pixels with dataset category ids.

        Returns per image ``image_id``, ``boxes`` [N, 4] xyxy, ``scores`` [N], ``labels`` [N]
        (contiguous), ``category_ids`` [N] and ``names`` (list of N strings).
        """
        if batch is None:
            return []
        images, padding_mask, targets = batch
        outputs = self.model(images, padding_mask)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = self.postprocess(outputs, orig_sizes)
        names = self.class_names
        label_map = self.label_map
        results = []
        for target, det in zip(targets, detections):
            labels = det["labels"].cpu()
            if label_map is not None:
                category_ids = torch.as_tensor(label_map["category_ids"])[labels]
            else:
                category_ids = labels.clone()
            results.append(
                {
                    "image_id": int(target["image_id"]),
                    "boxes": det["boxes"].cpu(),
                    "scores": det["scores"].cpu(),
                    "labels": labels,
                    "category_ids": category_ids,
                    "names": [names[i] for i in labels.tolist()],
                }
            )
        return results

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Random state too, so that dropout after a resume repeats the uninterrupted run.
        checkpoint["rng_states"] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    # ---------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        from hydra.utils import instantiate

        backbone, rest = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (backbone if name.startswith("backbone.") else rest).append(param)
        groups = [{"params": rest, "name": "transformer_and_heads"}]
        if backbone:
            groups.append({"params": backbone, "lr": self.hparams.backbone_lr, "name": "backbone"})
        optimizer = instantiate(self.hparams.optimizer)(groups)
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler(optimizer)}

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        schedule = self.hparams.schedule
        name = schedule["name"]
        warmup = int(schedule["warmup_steps"])
        if name == "step":
            if warmup:
                raise ValueError("schedule=step follows the official recipe without warmup; "
                                 "use schedule=cosine for warmup")  # fmt: skip
            scheduler = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=int(schedule["lr_drop"]), gamma=float(schedule["gamma"])
            )
            return {"scheduler": scheduler, "interval": "epoch", "name": "lr"}
        if name == "cosine":
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            floor = float(schedule["min_lr_ratio"])

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                progress = min((step - warmup) / max(total - warmup, 1), 1.0)
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"scheduler": scheduler, "interval": "step", "name": "lr"}
        raise ValueError(f"schedule.name must be 'step' or 'cosine', got {name!r}")


def coco_metric(backend: str = "pycocotools") -> MeanAveragePrecision:
    """torchmetrics' COCO mAP with COCOeval's exact thresholds.

    torchmetrics builds its default IoU and recall thresholds with float32 ``torch.linspace``;
    recall thresholds such as 0.07 then sit one float32 step above COCOeval's float64 ones, and
    ``searchsorted`` picks other points of the precision curve: AP moves by ~1e-4. Passing
    COCOeval's float64 values makes the numbers identical to pycocotools on a results file.
    """
    import numpy as np

    return MeanAveragePrecision(
        iou_type="bbox",
        backend=backend,
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
    )


def _without_crowd(target: dict[str, Any]) -> dict[str, Any]:
    """Targets for the loss: crowd regions are not objects to match (official DETR drops them)."""
    crowd = target.get("iscrowd")
    if crowd is None or not bool(crowd.any()):
        return target
    keep = crowd == 0
    return {**target, "boxes": target["boxes"][keep], "labels": target["labels"][keep]}


def _metric_targets(targets: Sequence[dict[str, Tensor]], orig_sizes: Tensor) -> list[dict]:
    """Ground truth in original pixels (xyxy) for torchmetrics, with crowd flags and areas."""
    result = []
    for target, size in zip(targets, orig_sizes):
        height, width = size.tolist()
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = box_cxcywh_to_xyxy(target["boxes"].float().cpu()) * scale
        entry = {"boxes": boxes, "labels": target["labels"].cpu()}
        if "iscrowd" in target:
            entry["iscrowd"] = target["iscrowd"].cpu()
        if "area" in target:
            entry["area"] = target["area"].float().cpu()
        result.append({k: v.to(orig_sizes.device) for k, v in entry.items()})
    return result


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as tensors and plain containers."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
