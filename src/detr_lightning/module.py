"""DETRModule: the LightningModule that trains, validates and runs DETR.

Every setting is a plain dict saved as a hyper-parameter, so a checkpoint rebuilds its module
with ``DETRModule.load_from_checkpoint(path)`` and no config. Two of them come from the data
and flow one way: in training the data module provides the label map (contiguous labels ->
dataset category ids and names) and the evaluation settings (validation split, sizes); in
evaluation and prediction they come from the checkpoint.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from .data.labels import LabelMap
from .data.sampler import sample_seed
from .epoch_sums import EpochSums
from .evaluation import CocoEvaluator
from .io import to_plain
from .models.criterion import SetCriterion
from .models.detr import build_detr
from .models.matcher import HungarianMatcher, NonFiniteCostError
from .models.postprocess import PostProcess
from .ops.distributed import any_rank, gather_to_main

log = logging.getLogger(__name__)

LOSS_LOG_KEYS = ("loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error")
# loss.* keys of the matcher, and the HungarianMatcher argument each one sets
MATCHER_KEYS = {"set_cost_class": "cost_class", "set_cost_bbox": "cost_bbox",
                "set_cost_giou": "cost_giou"}  # fmt: skip


def _check_keys(given: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(allowed)}")


def _arguments(function: Callable, exclude: Sequence[str] = ()) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name not in exclude]


class DETRModule(pl.LightningModule):
    """DETR with its matcher, set criterion, post-processing, optimizer and COCO evaluation.

    Args:
        model: keyword arguments of :func:`detr_lightning.models.build_detr`.
        loss: matching costs (``set_cost_class``/``bbox``/``giou``, see :class:`HungarianMatcher`)
            and loss weights (``eos_coef``, ``*_loss_coef``, see :class:`SetCriterion`); keys
            left out take those constructors' defaults (the paper's values).
        optimizer: a Hydra ``_partial_`` spec of the optimizer, completed in
            :meth:`configure_optimizers` with the parameter groups (None: AdamW, lr 1e-4,
            weight decay 1e-4, as the paper).
        backbone_lr: learning rate of the trainable backbone stages; 0 freezes the backbone.
        schedule: a Hydra ``_partial_`` spec of a :mod:`detr_lightning.schedules` function
            (None: constant learning rate).
        postprocess: keyword arguments of :class:`PostProcess`.
        label_map: ``{"category_ids": [...], "names": [...]}``, one entry per label; labels
            beyond it (a model with more classes than the data) stand for no category.
        data: the data module's ``evaluation_settings()`` (stored so evaluation can repeat the
            validation without the training config); fitting adds
            ``train_per_device_batch_size``, the images per device of the training batches.
        eval_backend: COCO evaluation backend: "auto" (faster_coco_eval when installed),
            "pycocotools" or "faster_coco_eval".
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
        data: Mapping[str, Any] | None = None,
        eval_backend: str = "auto",
    ) -> None:
        super().__init__()
        model = to_plain(model)
        loss = to_plain(loss) or {}
        postprocess = to_plain(postprocess) or {}
        criterion_keys = _arguments(SetCriterion, ("num_classes", "matcher",
                                                   "num_decoder_layers", "aux_loss"))  # fmt: skip
        _check_keys(loss, [*MATCHER_KEYS, *criterion_keys], "loss")
        _check_keys(postprocess, _arguments(PostProcess), "postprocess")
        self.model = build_detr(**model)
        num_classes = self.model.num_classes
        if label_map is not None:
            label_map = padded_label_map(label_map, num_classes).to_dict()
        self.save_hyperparameters(
            {
                # A rebuilt module gets every backbone weight from its checkpoint: it must
                # neither download ImageNet weights again nor need the original local file.
                "model": {**model, "pretrained_backbone": False, "backbone_weights": None},
                "loss": loss,
                "optimizer": to_plain(optimizer),
                "backbone_lr": backbone_lr,
                "schedule": to_plain(schedule),
                "postprocess": postprocess,
                "label_map": label_map,
                "data": to_plain(data),
                "eval_backend": eval_backend,
            }
        )
        if float(backbone_lr) == 0.0:
            self.model.backbone.requires_grad_(False)
        self.criterion = SetCriterion(
            num_classes,
            HungarianMatcher(**{MATCHER_KEYS[k]: v for k, v in loss.items() if k in MATCHER_KEYS}),
            num_decoder_layers=len(self.model.transformer.decoder.layers),
            aux_loss=self.model.aux_loss,
            **{k: v for k, v in loss.items() if k not in MATCHER_KEYS},
        )
        self.postprocess = PostProcess(**postprocess)
        self.evaluator: CocoEvaluator | None = None
        # Where test epochs write their COCO results file (set by the evaluation entry point).
        self.results_file: str | None = None
        # A test after fitting repeats the run's own validation: its batch size is no news.
        self._fitted = False
        # Training steps skipped in a row for a NaN/Inf loss or gradient, and the image ids of
        # the last one (read by callbacks.NonFiniteStop).
        self.nonfinite_streak = 0
        self.nonfinite_images: list[int] = []
        self._step_images: list[int] = []
        self._skipping = False  # the current step is skipped: drop its (zero) update
        self._running_stats: list[tuple[Tensor, Tensor]] = []
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
        those of :func:`detr_lightning.predict.predict`.
        """
        from .predict import predict  # on use: prediction is a layer above the module

        return predict(self, images, threshold=threshold, **kwargs)

    # ----------------------------------------------------------------------- set-up with data
    def setup(self, stage: str) -> None:
        """Check the data's labels against the model's and prepare COCO evaluation.

        In training the label map came from the data module (``build_module``); here they must
        agree. In evaluation the checkpoint's map relabels the data.
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
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
        anyway: the step waits for the device there and once more for the loss check.
        """
        images, padding_mask, targets = batch
        self._step_images = [int(target["image_id"]) for target in targets]  # host ints
        self._save_running_stats()
        outputs = self.model(images, padding_mask)
        # before the rest of the criterion, which all-reduces num_boxes
        try:
            indices, nonfinite = self.criterion.match(outputs, targets), False
        except NonFiniteCostError:
            indices, nonfinite = None, True
        if any_rank(torch.tensor(nonfinite)):
            return self._skipped("the predictions are NaN/Inf" if nonfinite else None)
        losses = self.criterion(outputs, targets, indices)
        total = self.criterion.weighted_total(losses)
        nonfinite = ~torch.isfinite(total.detach())
        if any_rank(nonfinite):
            reason = f"the loss is {float(total.detach())}"
            return self._skipped(reason if bool(nonfinite) else None)
        batch_size = len(targets)
        # The step value is this rank's; the epoch values are summed here and averaged over
        # ranks once, at the epoch's last batch (on_train_batch_end).
        self.log("train/loss_step", total, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=batch_size)  # fmt: skip
        self.epoch_sums.add({"loss": total, **losses}, weight=batch_size)
        # Samples that stood in for unreadable images (named in the dataset's warnings).
        # (filled in on the device: a host value would be copied over, waiting for the device)
        count = sum(int(target["stand_in_for"]) >= 0 for target in targets)
        stand_ins = torch.full((), float(count), device=total.device)
        self.epoch_sums.add({"stand_in_images": stand_ins}, mean=False)
        return total

    def training_epoch_means(self) -> dict[str, float]:
        """The epoch's training losses so far, averaged over every rank's batches (weighted by
        batch size), and ``stand_in_images`` summed. Every rank must call it."""
        return self.epoch_sums.means()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # Logged at the epoch's last batch, so that callbacks find train/loss & co. in
        # trainer.callback_metrics from their on_train_epoch_end on, as with per-step logging
        # (the module's own on_train_epoch_end runs after theirs).
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
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

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the update of a skipped step (:meth:`training_step`); gradients that are NaN/Inf
        are found in :meth:`configure_gradient_clipping`."""
        if self._skipping:
            self._skipping = False
            optimizer.zero_grad(set_to_none=True)  # an optimizer leaves gradient-less weights

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Skip a step whose gradients are NaN/Inf, and clip the others: one total norm serves
        both (``torch.nn.utils.clip_grad_norm_`` computes the same norm and clips with it).

        The gradients are already all-reduced, so every rank sees the same ones and decides
        alike. Under fp16 mixed precision the gradient scaler skips inf gradients itself and
        Lightning clips. Lightning's mixed-precision plugin refuses to clip for any fused
        optimizer, because under fp16 such an optimizer unscales the gradients itself, so they
        would be clipped while still scaled; bf16 scales nothing, so here a fused optimizer is
        clipped under bf16-mixed too. Strategies with their own precision plugin (FSDP) decide
        the skip on all ranks together and clip as Lightning does; DeepSpeed keeps its gradients
        to itself (``p.grad`` is None), so it is neither checked nor clipped here.
        """
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]  # fmt: skip
        if not params:  # a skipped step
            return
        plugin = self.trainer.precision_plugin
        if _loss_scaler(self.trainer) is not None:
            self.nonfinite_streak = 0
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        native = type(plugin) in (Precision, MixedPrecision)
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        nonfinite = ~torch.isfinite(total)
        # sharded gradients (FSDP) differ between ranks: decide together there
        if bool(nonfinite) if native else any_rank(nonfinite):
            self._note_skip("a gradient is NaN/Inf")
            optimizer.zero_grad(set_to_none=True)
            return
        self.nonfinite_streak = 0
        if gradient_clip_val is None or gradient_clip_val <= 0:  # Lightning's "off"
            return
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
        if not native:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif algorithm == GradClipAlgorithmType.NORM:
            torch.nn.utils.clip_grads_with_norm_(params, float(gradient_clip_val), total)
        else:
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))

    def _save_running_stats(self) -> None:
        """Copy the BatchNorm running statistics that this step's forward pass will update."""
        self._running_stats = [
            (buffer, buffer.detach().clone())
            for module in self.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
            if buffer is not None
        ]

    def _skipped(self, reason: str | None) -> Tensor:
        """The zero loss that stands in for a skipped step (see :meth:`training_step`)."""
        self._note_skip(reason)
        self._skipping = True
        # a zero gradient for every trainable weight, whatever the weights' values
        weights = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([w.sum() for w in weights]).sum() * 0

    def _note_skip(self, reason: str | None) -> None:
        """Undo this step's BatchNorm updates, count the step, and warn (on rank 0) naming its
        images.

        ``reason``: what is wrong with this rank's batch, None if it is fine here but not on
        another rank. Every rank must call this.
        """
        with torch.no_grad():
            for buffer, saved in self._running_stats:
                buffer.copy_(saved)
        self.nonfinite_streak += 1
        gathered = gather_to_main((reason, self._step_images) if reason else None)
        if gathered is None:  # not rank 0
            return
        affected = [(rank, *entry) for rank, entry in enumerate(gathered) if entry is not None]
        self.nonfinite_images = [image_id for _, _, ids in affected for image_id in ids]
        ranked = len(gathered) > 1
        batches = "; ".join(
            f"{reason} for the batch of images {ids}" + (f" on rank {rank}" if ranked else "")
            for rank, reason, ids in affected
        )
        log.warning(
            "global step %d: %s; skipping the step on every rank (%d in a row)",
            self.trainer.global_step,
            batches,
            self.nonfinite_streak,
        )

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
        from hydra.utils import instantiate

        backbone, rest = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (backbone if name.startswith("backbone.") else rest).append(param)
        groups = [{"params": rest, "name": "transformer_and_heads"}]
        if backbone:
            groups.append({"params": backbone, "lr": self.hparams.backbone_lr, "name": "backbone"})
        spec = self.hparams.optimizer
        factory = (
            functools.partial(torch.optim.AdamW, lr=1e-4, weight_decay=1e-4)
            if spec is None
            else instantiate(spec)
        )
        # Lightning cannot clip the gradients of a fused optimizer under fp16's loss scaling
        scaled = self._trainer is not None and _loss_scaler(self.trainer) is not None
        fused = {} if scaled else fused_by_default(factory, backbone + rest)
        try:
            # copies: an optimizer fills its groups with its settings (``fused`` among them)
            # before it may refuse them, and the retry below must not inherit them
            optimizer = factory([dict(group) for group in groups], **fused)
        except (RuntimeError, ValueError) as err:
            if not fused:
                raise
            # an optimizer that takes ``fused`` but has no such kernel for this device; an
            # error of its own (a bad lr) comes again from this call
            optimizer = factory(groups)
            log.info(f"optimizer: no fused kernel here ({err}); torch's default update")
        else:
            if fused:
                log.info("optimizer: fused kernel (optimizer.fused=false for torch's default)")
        if self.hparams.schedule is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = instantiate(self.hparams.schedule)(optimizer, total_steps=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def _loss_scaler(trainer: pl.Trainer) -> Any:
    """The gradient scaler of fp16 mixed precision, or None."""
    return getattr(trainer.precision_plugin, "scaler", None)


def fused_by_default(factory: Callable, params: Sequence[Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` when ``factory`` (an optimizer class or a partial of one) can fuse
    its update into one kernel, every parameter is on a CUDA device or on the CPU (all on one
    kind) and the config chose neither ``fused`` nor ``foreach``; else ``{}`` (torch's own
    default).

    On CUDA torch defaults to its multi-tensor (foreach) update; the fused kernel computes the
    same AdamW step in fewer launches and passes over the weights (``bench/train_step.py``).
    On the CPU torch defaults to a Python loop of a dozen operations per parameter: for the
    12M parameters (88 tensors) of ``bench/train.py``'s small DETR, one AdamW step took 52-64
    ms that way, 50-54 ms with foreach and 11 ms fused on a 2-core CPU, of a training step of
    about 560 ms. The fused step differs from the loop by float32 rounding only (6e-8 after
    33 steps). ``optimizer.fused=false`` keeps torch's default."""
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    if keywords.get("fused") is not None or keywords.get("foreach") is not None:
        return {}
    target = factory.func if isinstance(factory, functools.partial) else factory
    try:
        accepts = "fused" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    kinds = {p.device.type for p in params}
    if not accepts or len(kinds) != 1 or kinds.isdisjoint({"cuda", "cpu"}):
        return {}
    if any(not p.is_floating_point() for p in params):
        return {}
    return {"fused": True}


def padded_label_map(
    label_map: LabelMap | Mapping[str, Any], num_classes: int, source: object = "the label map"
) -> LabelMap:
    """``label_map`` with one entry per model label: labels past its end stand for no
    category (the "unused" convention of :mod:`detr_lightning.data.labels`).

    A map with more labels than the model is an error that names ``source`` (e.g. the
    annotation file), the category ids the model cannot predict, and the fix."""
    if not isinstance(label_map, LabelMap):
        label_map = LabelMap.from_dict(label_map)
    if label_map.num_classes > num_classes:
        unknown = [c for c in label_map.category_ids[num_classes:] if c >= 0]
        raise ValueError(
            f"{source} has {label_map.num_classes} classes but model.num_classes={num_classes}: "
            f"category ids {unknown} would be unknown to the model. Set "
            f"model.num_classes={label_map.num_classes} or null (= from the dataset); with "
            "pretrained=... the class head is re-initialized."
        )
    return label_map.padded(num_classes)


_RANK_STRIDE = 0xD6E8FEB86659FD93  # odd: ranks never share a batch seed in practice


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The global RNG's seed for training batch ``batch_idx`` of ``epoch`` on ``rank``."""
    return sample_seed(seed + 1 + rank * _RANK_STRIDE, epoch, batch_idx)


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
