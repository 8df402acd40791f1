"""DETRModule: the LightningModule that trains, validates and runs DETR.

Every setting is a plain dict saved as a hyper-parameter, so a checkpoint rebuilds its module
with ``DETRModule.load_from_checkpoint(path)`` and no config. Two of them come from the data
and flow one way: in training the data module provides the label map (contiguous labels ->
dataset category ids and names) and the evaluation settings (validation split, sizes); in
evaluation and prediction they come from the checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..checkpoints.legacy import CRITERION_TARGET, POSTPROCESS_TARGET, upgrade_module_hparams
from ..data.labels import LabelMap, padded_label_map
from ..evaluation.evaluator import CocoEvaluator, EvaluationResult
from ..inference.graphs import enable_cpu_graphs
from ..inference.predictor import Predictor
from ..models.matcher import NonFiniteCostError
from . import compat
from .capture import CapturedSteps, install_capture
from .epoch_sums import EpochSums
from .nonfinite import NonFiniteSkip, loss_scaler
from .optim import build_optimizer, build_schedule, parameter_groups
from .rng import batch_seed, capture_rng_states, restore_rng_states
from .specs import build, plain

log = logging.getLogger(__name__)

LOSS_LOG_KEYS = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")


class DETRModule(NonFiniteSkip):
    """DETR with its matcher, set criterion, post-processing, optimizer and COCO evaluation.

    The settings are config specs, mappings with a ``_target_`` as the config groups of the
    same names write them, which the module builds itself (so a checkpoint rebuilds it with no
    config); keys left out take the constructors' defaults, the paper's values.

    Args:
        model: the ``model`` spec (:func:`~detr_lightning.models.build_detr`'s settings, the
            backbone's spec under ``backbone``, whose ``lr`` is the backbone's learning rate).
            ``num_classes`` None: the label map's class count.
        loss: the ``loss`` spec (:func:`~detr_lightning.models.build_criterion`: matching
            costs and loss weights); None: the paper's.
        optimizer: a ``_partial_`` spec of the optimizer, completed in
            :meth:`configure_optimizers` with the parameter groups (None: AdamW, lr 1e-4,
            weight decay 1e-4, as the paper).
        schedule: a ``_partial_`` spec of a :mod:`detr_lightning.lightning.optim` schedule
            (None: constant learning rate).
        postprocess: the ``postprocess`` spec (:class:`~detr_lightning.models.PostProcess`).
        label_map: ``{"category_ids": [...], "names": [...]}`` or a :class:`LabelMap`, one
            entry per label; labels beyond it (a model with more classes than the data) stand
            for no category. It is checked against ``num_classes`` here, once.
        data: the data module's ``evaluation_settings()`` (stored so evaluation can repeat the
            validation without the training config); fitting adds
            ``train_per_device_batch_size``, the images per device of the training batches.
        eval_backend: COCO evaluation backend: "auto" (faster_coco_eval when installed),
            "pycocotools" or "faster_coco_eval".
        backbone_lr: only in checkpoints of the package's first layout (now the backbone's
            ``lr``); their flat ``model``, ``loss`` and ``postprocess`` mappings are read too
            (:mod:`detr_lightning.checkpoints.legacy`).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        loss: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        postprocess: Mapping[str, Any] | None = None,
        label_map: LabelMap | Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        eval_backend: str = "auto",
        backbone_lr: float | None = None,
    ) -> None:
        super().__init__()
        settings = upgrade_module_hparams(
            {
                "model": plain(model),
                "loss": plain(loss) or {"_target_": CRITERION_TARGET},
                "optimizer": plain(optimizer),
                "schedule": plain(schedule),
                "postprocess": plain(postprocess) or {"_target_": POSTPROCESS_TARGET},
                **({"backbone_lr": backbone_lr} if backbone_lr is not None else {}),
            }
        )
        spec = settings["model"]
        if label_map is not None and not isinstance(label_map, LabelMap):
            label_map = LabelMap.from_dict(label_map)
        if spec.get("num_classes") is None:  # the config's null: as many as the data has
            if label_map is None:
                raise ValueError("model.num_classes is null and there is no label map to count")
            spec["num_classes"] = label_map.num_classes
        if label_map is not None:  # the one check of num_classes against the labels
            label_map = padded_label_map(label_map, spec["num_classes"])
        self.model = enable_cpu_graphs(build(spec))
        self.save_hyperparameters(
            {
                "model": _without_weight_files(spec),
                "loss": settings["loss"],
                "optimizer": settings["optimizer"],
                "schedule": settings["schedule"],
                "postprocess": settings["postprocess"],
                "label_map": None if label_map is None else label_map.to_dict(),
                "data": plain(data),
                "eval_backend": eval_backend,
            }
        )
        self.criterion = build(
            settings["loss"],
            num_classes=self.model.num_classes,
            num_decoder_layers=len(self.model.transformer.decoder.layers),
            aux_loss=self.model.aux_loss,
            denoising=self.model.has_denoising,
        )
        self.postprocess = build(settings["postprocess"])
        self.evaluator: CocoEvaluator | None = None
        # the last validation's or test's result (the images it scored, for detr-eval's files)
        self.evaluation_result: EvaluationResult | None = None
        # Where test epochs write their COCO results file (set by the evaluation entry point).
        self.results_file: str | None = None
        # A test after fitting repeats the run's own validation: its batch size is no news.
        self._fitted = False
        self._init_nonfinite()  # the skipped-step bookkeeping (NonFiniteSkip)
        # The epoch's training losses (their epoch means are logged from here, not by
        # Lightning, so that a checkpoint written mid-epoch carries them).
        self.epoch_sums = EpochSums()
        self._epoch_means_logged: int | None = None  # the epoch whose means were logged

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

    def predict(self, images, threshold: float = 0.7, **kwargs) -> list[dict[str, Any]]:
        """Detect objects in one image or a list of them (file paths, PIL images, uint8 or
        [0, 1] float tensors [3, H, W]) with the evaluation preprocessing; returns per image
        ``scores``, ``labels``, ``names``, ``category_ids``, ``boxes`` (xyxy in original image
        pixels) and ``queries`` of the detections scoring above ``threshold``, best first.
        Other keywords (``top_k``, ``batch_size``, ``device``, ``bf16``) and the formats are
        those of :meth:`detr_lightning.inference.Predictor.predict`.
        """
        return self.predictor().predict(images, threshold=threshold, **kwargs)

    def predictor(self) -> Predictor:
        """A :class:`~detr_lightning.inference.Predictor` of this module's model, with its label
        map and the preprocessing it was evaluated with."""
        return Predictor(self.model, self.label_map, self.hparams.get("data"))

    # ----------------------------------------------------------------------- set-up with data
    def setup(self, stage: str) -> None:
        """Check the data's labels against the model's and prepare COCO evaluation.

        In training the label map came from the data module (``build_module``); here they must
        agree. In evaluation the checkpoint's map relabels the data.
        """
        trainer = compat.attached_trainer(self)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        data_map = getattr(datamodule, "label_map", None)
        num_classes = self.model.num_classes
        if data_map is not None and self.label_map is not None and stage != "fit":
            # evaluation and prediction: the checkpoint's labels relabel the data
            datamodule.use_label_map(LabelMap.from_dict(self.label_map))
        elif data_map is not None:
            source = getattr(datamodule, "val_annotation_file", "the data module")
            data_labels = padded_label_map(data_map, num_classes, source).to_dict()
            if self.label_map is None:
                self.hparams["label_map"] = data_labels
            elif data_labels != self.label_map:
                raise ValueError(
                    "the data's label map differs from the model's (category ids or names); "
                    "train with the data's labels (build_module / pretrained=... re-initializes "
                    "the class head) or relabel the data with datamodule.use_label_map(...)"
                )
        if stage == "fit" and getattr(datamodule, "per_device_batch_size", None) is not None:
            # what evaluation compares its own batch with: padding depends on the batch
            data = dict(self.hparams.get("data") or {})
            data["train_per_device_batch_size"] = int(datamodule.per_device_batch_size)
            if "val_batch_size" in data and hasattr(datamodule, "val_batch_size"):
                data["val_batch_size"] = int(datamodule.val_batch_size)  # as setup settled it
            self.hparams["data"] = data
            self._fitted = True
        elif stage in ("validate", "test") and not self._fitted:
            self._check_eval_batch_size(getattr(datamodule, "per_device_val_batch_size", None))
        annotation_file = getattr(datamodule, "val_annotation_file", None)
        if stage in ("fit", "validate", "test") and annotation_file is not None:
            self.evaluator = CocoEvaluator(
                annotation_file,
                self.category_ids(),
                max_dets=self.model.num_queries,
                backend=self.hparams.eval_backend,
            )

    def _check_eval_batch_size(self, per_device: int | None) -> None:
        """Warn when evaluation pads batches of another size than training did.

        Convolutions near a smaller image's border see the padding its batch adds, so outputs
        depend on the batch; checkpoints without the training batch size are not checked.
        """
        trained = (self.hparams.get("data") or {}).get("train_per_device_batch_size")
        if trained is None or per_device is None or per_device == trained:
            return
        if self.model.batch_invariant or self.global_rank != 0:
            return
        log.warning(
            "evaluating with %d images per device but the model was trained with %d: batches "
            "pad their images to other sizes than in training, and the padding changes the "
            "results of the smaller images. Evaluate with %d images per device "
            "(data.val_batch_size = %d x devices), or set batch_invariant=true to give each "
            "image the result it gets alone",
            per_device,
            trained,
            trained,
            trained,
        )

    def category_ids(self) -> list[int]:
        """Dataset category id of each label (-1: no category); identity without a label map."""
        if self.label_map is None:
            return list(range(self.model.num_classes))
        return list(self.label_map["category_ids"])

    # ------------------------------------------------------------------------------ training
    # The ``capture`` setting of the training config (set by the entry point) and what it
    # installs at the fit's start: CUDA graphs of the training forward/backward per batch shape.
    capture_setting: Any = None
    captured_steps: CapturedSteps | None = None

    def on_fit_start(self) -> None:
        install_capture(self, self.capture_setting)

    def _losses(self, batch) -> tuple[Tensor, dict[str, Tensor], dict]:
        images, padding_mask, targets = batch
        outputs = self.model(images, padding_mask)
        losses = self.criterion(outputs, targets)
        return self.criterion.weighted_total(losses), losses, outputs

    def training_step(self, batch, batch_idx: int) -> Tensor:
        """The weighted total loss of ``batch``, or a zero stand-in when the predictions or
        the loss are NaN/Inf on any rank: that step is then skipped on every rank.

        The ranks decide together (an all-reduce of the flag): under DDP every rank must run
        the backward pass and its gradient all-reduce, so a skipped step backpropagates zero
        (Lightning refuses a None under DDP) and :meth:`on_before_optimizer_step` drops the
        update. The BatchNorm statistics that the forward pass changed are put back, so a
        skipped step changes nothing.

        Non-finite predictions show in the matching cost, which the matcher reads on the host
        anyway; the loss is checked with the gradients, before the optimizer step
        (:meth:`_check_loss`), so that a step reads the device once more, not twice. The step's
        loss is logged for the loggers on the device, which read it at their logging interval.
        """
        images, padding_mask, targets = batch
        self._start_step(targets)
        if self.captured_steps is not None:
            outputs = self.captured_steps(images, padding_mask)
        else:  # the targets make the denoising queries of a model that has them
            outputs = self.model(images, padding_mask, targets)
        # before the rest of the criterion, which all-reduces num_boxes
        try:
            indices, nonfinite = self.criterion.match(outputs, targets), False
        except NonFiniteCostError:
            indices, nonfinite = None, True
        if self._any_rank(nonfinite):
            return self._skipped("the predictions are NaN/Inf" if nonfinite else None)
        losses, total = self.criterion.losses_and_total(outputs, targets, indices)
        batch_size = len(targets)
        # Samples that stood in for unreadable images (named in the dataset's warnings).
        # (filled in on the device: a host value would be copied over, waiting for the device)
        count = sum(int(target["stand_in_for"]) >= 0 for target in targets)
        stand_ins = torch.full((), float(count), device=total.device)

        def record() -> None:  # what a kept step adds to the epoch's sums
            # The step value is this rank's; the epoch values are summed here and averaged over
            # ranks once, at the epoch's last batch (on_train_batch_end).
            self.epoch_sums.add({"loss": total, **losses}, weight=batch_size)
            self.epoch_sums.add({"stand_in_images": stand_ins}, mean=False)

        skipped = self._check_loss(total, record)
        if skipped is not None:
            return skipped
        # not on the progress bar, which would read it at every step: LossProgressBar shows
        # it as read at the logging interval
        self.log("train/loss_step", total, on_step=True, on_epoch=False, batch_size=batch_size)
        return total

    def training_epoch_means(self) -> dict[str, float]:
        """The epoch's training losses so far, averaged over every rank's batches (weighted by
        batch size), and ``stand_in_images`` summed. Every rank must call it."""
        return self.epoch_sums.means()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._record_unchecked()
        # Logged at the epoch's last batch, so that callbacks find train/loss & co. in
        # trainer.callback_metrics from their on_train_epoch_end on, as with per-step logging
        # (the module's own on_train_epoch_end runs after theirs).
        if compat.is_last_batch(self.trainer):
            self._log_epoch_means()

    def on_train_epoch_end(self) -> None:
        if self._epoch_means_logged != self.current_epoch:  # an epoch that ended early
            self._log_epoch_means()

    def _log_epoch_means(self) -> None:
        means = self.training_epoch_means()
        # logged once per epoch, already the epoch's means: the batch size weighs nothing (it
        # is given so that Lightning does not guess it from the batch under way, with a warning)
        self.log_dict({f"train/{name}": value for name, value in means.items()},
                      on_step=False, on_epoch=True, batch_size=1)  # fmt: skip
        self._epoch_means_logged = self.current_epoch

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Start the epoch's loss sums at its first batch; seed the global RNG, which dropout
        draws from, for this batch of this rank.

        Dropout draws as many numbers as the batch's padded size asks, so the ranks' RNG states
        drift apart, and a checkpoint (written by rank 0) would bring back rank 0's state only:
        a resumed run's other ranks would drop other units than the uninterrupted run's. Seeded
        from (the run's seed, epoch, batch, rank) at every batch, dropout is a function of where
        the run is, and a resume from any checkpoint repeats it on every rank. Runs without
        ``seed_everything`` (no ``PL_GLOBAL_SEED``) keep the RNG as it comes.
        """
        if self.epoch_sums.epoch != self.current_epoch:
            # here, not in on_train_epoch_start: Lightning skips that hook in the epoch after
            # a checkpoint written at an epoch's last batch, as in a run resumed mid-epoch
            self.epoch_sums.reset(self.current_epoch)
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None:
            epoch, rank = self.current_epoch, self.global_rank
            torch.manual_seed(batch_seed(int(seed), epoch, batch_idx, rank))

    def _eval_step(self, batch, prefix: str) -> None:
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
        if self.evaluator is None:
            raise RuntimeError(
                "COCO evaluation needs a data module with a val_annotation_file (the "
                "CocoDataModule): pass datamodule=... to the trainer"
            )
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        self.evaluator.update(targets, self.postprocess(outputs, orig_sizes))

    def _eval_epoch_end(self, prefix: str) -> None:
        assert self.evaluator is not None  # _eval_step checked it
        result = self.evaluator.compute(self.results_file if prefix == "test" else None)
        self.evaluation_result = result
        self.evaluator.reset()
        for key, value in result.metrics().items():
            # Identical on every rank (rank 0 computed and broadcast them): "max" keeps them
            # exact while telling Lightning that they are synchronized.
            self.log(f"{prefix}/{key}", value, prog_bar=key in ("map", "map_50"),
                     sync_dist=True, reduce_fx="max")  # fmt: skip

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx: int) -> list[dict[str, Any]]:
        """Detections in original image pixels with dataset category ids.

        Returns per image ``image_id``, ``boxes`` [N, 4] xyxy, ``scores`` [N], ``labels`` [N]
        (contiguous), ``category_ids`` [N] (-1: no category) and ``names`` (list of N strings).
        """
        images, padding_mask, targets = batch
        outputs = self.model(images, padding_mask)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = self.postprocess(outputs, orig_sizes)
        names = self.class_names
        category_table = torch.as_tensor(self.category_ids())
        results = []
        for target, det in zip(targets, detections):
            labels = det["labels"].cpu()
            results.append(
                {
                    "image_id": int(target["image_id"]),
                    "boxes": det["boxes"].cpu(),
                    "scores": det["scores"].cpu(),
                    "labels": labels,
                    "category_ids": category_table[labels],
                    "names": [names[i] for i in labels.tolist()],
                }
            )
        return results

    # --------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Random state too (rank 0's), for whatever draws from it between batches; training's
        # dropout is seeded per batch and rank (on_train_batch_start).
        checkpoint["rng_states"] = capture_rng_states()
        # the sums over all ranks (every rank dumps a checkpoint; rank 0's is written)
        checkpoint["train_epoch_sums"] = self.epoch_sums.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])
        if "train_epoch_sums" in checkpoint:  # counted once: by rank 0
            self.epoch_sums.load_state_dict(checkpoint["train_epoch_sums"], self.device,
                                            keep=self.global_rank == 0)  # fmt: skip

    # ---------------------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        """The optimizer of the ``optimizer`` spec over :func:`~.optim.parameter_groups` (the
        backbone at its ``lr``), and the ``schedule`` spec's learning-rate schedule."""
        groups = parameter_groups(self.model, getattr(self.model.backbone, "lr", None))
        # Lightning cannot clip the gradients of a fused optimizer under fp16's loss scaling
        trainer = compat.attached_trainer(self)
        scaled = trainer is not None and loss_scaler(trainer) is not None
        optimizer = build_optimizer(groups, self.hparams.optimizer, allow_fused=not scaled)
        if self.hparams.schedule is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = build_schedule(self.hparams.schedule, optimizer, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def _without_weight_files(spec: dict[str, Any]) -> dict[str, Any]:
    """The model spec as a checkpoint stores it: a rebuilt module gets every backbone weight
    from its checkpoint, so it must neither download ImageNet weights again nor need the
    original local file."""
    backbone = spec.get("backbone")
    if not isinstance(backbone, dict):  # a name, or the builder's default
        return spec
    return {**spec, "backbone": {**backbone, "pretrained": False, "weights": None}}
