"""DETR's set prediction loss: Hungarian matching, then CE + L1 + GIoU on matched pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from ..ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou_loss
from ..ops.distributed import all_reduce_mean
from ..ops.transfer import host_to_device
from ..utils.signatures import split_keywords
from .matcher import HungarianMatcher, Indices


class SetCriterion(nn.Module):
    """Unweighted loss terms of DETR, plus the weights to combine them.

    Terms (per decoder layer; earlier layers get the suffix ``_0``, ``_1``, ...):
    ``loss_ce`` cross-entropy over all queries, unmatched ones labelled "no object" with weight
    ``eos_coef``; ``loss_bbox`` L1 and ``loss_giou`` 1 - GIoU over matched pairs, both divided by
    the number of target boxes averaged over all ranks. ``class_error`` (top-1 error in % on
    matched queries) and ``cardinality_error`` (|#predicted objects - #targets|) are logged only.

    Training-only queries (:mod:`~detr_lightning.models.training_queries`): with several query
    groups (``group_outputs``) each group is matched on its own and every term is the mean over
    the groups; denoising queries (``dn_outputs``) add ``loss_ce_dn``, ``loss_bbox_dn`` and
    ``loss_giou_dn`` (suffixed per layer as above) with the same weights: cross-entropy against
    the true labels, mean over the real denoising queries, and L1 / 1 - GIoU against the true
    boxes, divided by the number of target boxes times the denoising groups.

    Args:
        num_classes: object classes (without no-object).
        matcher: assigns predictions to targets.
        eos_coef: relative weight of the no-object class in ``loss_ce``.
        ce_loss_coef, bbox_loss_coef, giou_loss_coef: weights in :attr:`weight_dict`.
        num_decoder_layers: with ``aux_loss``, weights get one suffixed copy per earlier layer.
        denoising: the model has denoising queries: their terms get the same weights.
        masks: the model predicts masks (``pred_masks``, the panoptic model): ``loss_mask``
            (sigmoid focal loss, alpha 0.25, gamma 2, mean over pixels) and ``loss_dice``
            (1 - soft Dice) on the final layer's matched queries, each summed over them and
            divided by the number of target boxes, against the targets' ``masks``; the
            predictions are upsampled (bilinear) to the targets' padded size first.
        mask_loss_coef, dice_loss_coef: their weights (the official 1 and 1).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        ce_loss_coef: float = 1.0,
        bbox_loss_coef: float = 5.0,
        giou_loss_coef: float = 2.0,
        num_decoder_layers: int = 6,
        aux_loss: bool = True,
        denoising: bool = False,
        masks: bool = False,
        mask_loss_coef: float = 1.0,
        dice_loss_coef: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        base = {"loss_ce": ce_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
        self.weight_dict = dict(base)
        self._weights_cache: tuple[tuple, Tensor] | None = None
        if aux_loss:
            for i in range(num_decoder_layers - 1):
                self.weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        if denoising:  # the denoising queries' terms, with the same weights
            self.weight_dict.update({_dn_name(k): v for k, v in list(self.weight_dict.items())})
        self.masks = masks
        if masks:  # the final layer only, as the official code
            self.weight_dict.update({"loss_mask": mask_loss_coef, "loss_dice": dice_loss_coef})

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """Sum of ``weight * term`` over the terms that have a weight."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)

    def match(self, outputs: dict, targets: Sequence[dict[str, Tensor]]) -> list[Indices]:
        """The matcher's assignment for the final and every auxiliary layer (raises
        :class:`~detr_lightning.models.matcher.NonFiniteCostError` on NaN/Inf predictions);
        index arrays as the matcher gives them (numpy for :class:`HungarianMatcher`)."""
        assign = getattr(self.matcher, "assign_layers", self.matcher.match_layers)
        return assign(_layers(outputs), targets)

    def forward(
        self,
        outputs: dict,
        targets: Sequence[dict[str, Tensor]],
        indices: Sequence[Indices] | None = None,
    ) -> dict[str, Tensor]:
        """Compute every loss term.

        Args:
            outputs: the model's dict (``pred_logits`` [B,Q,C+1], ``pred_boxes`` [B,Q,4],
                optional ``aux_outputs``).
            targets: per image ``labels`` int64 [T] in [0, num_classes) and ``boxes`` [T, 4]
                cxcywh normalized to the unpadded image.
            indices: :meth:`match`'s result, if already computed (per layer, per image a pair
                of index tensors or arrays).
        Returns:
            unweighted terms (scalars); combine with :attr:`weight_dict` or :meth:`weighted_total`.

        All layers are computed together: one cross-entropy over [L, B, Q], one L1 and one GIoU
        over the matched pairs of every layer, summed per layer, so the number of device
        operations does not grow with the number of decoder layers. The matched indices go to
        the device in one copy.
        """
        return self.losses_and_total(outputs, targets, indices)[0]

    def losses_and_total(
        self,
        outputs: dict,
        targets: Sequence[dict[str, Tensor]],
        indices: Sequence[Indices] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`forward`'s terms and their :meth:`weighted_total`, which is computed from the
        terms of all layers at once (a product and a sum, not two operators per term)."""
        # Labels are not checked here: that would cost a host sync per step. The dataset checks
        # them against its label map once, and DETRModule.setup the map against num_classes.
        layers = _layers(outputs)
        if indices is None:
            indices = self.match(outputs, targets)
        if len(indices) != len(layers):
            raise ValueError(
                f"got indices for {len(indices)} layers, the outputs have {len(layers)}"
            )
        logits = torch.stack([layer["pred_logits"] for layer in layers]).float()  # [L, B, Q, C+1]
        boxes = torch.stack([layer["pred_boxes"] for layer in layers]).float()  # [L, B, Q, 4]
        num_layers, batch, num_queries = logits.shape[:3]
        device = logits.device

        # Host side (numpy): every matched pair as (layer, image, query, index into the
        # concatenated targets), layer by layer, and the target count of each image; one copy
        # to the device.
        sizes = np.array([len(t["labels"]) for t in targets], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        columns: list[np.ndarray] = []
        pairs_per_layer = []
        for layer_index, layer_indices in enumerate(indices):
            count = 0
            for image, (src, tgt) in enumerate(layer_indices):
                src, tgt = np.asarray(src, dtype=np.int64), np.asarray(tgt, dtype=np.int64)
                count += len(src)
                layer, images = np.full_like(src, layer_index), np.full_like(src, image)
                columns.append(np.stack([layer, images, src, tgt + starts[image]]))
            pairs_per_layer.append(count)
        pairs = np.concatenate(columns, axis=1) if columns else np.zeros((4, 0), np.int64)
        num_pairs = pairs.shape[1]
        packed = host_to_device(torch.from_numpy(np.concatenate([pairs.ravel(), sizes])), device)
        layer_idx, batch_idx, query_idx, target_idx = packed[: 4 * num_pairs].view(4, num_pairs)
        num_targets = packed[4 * num_pairs :].float()  # [B]

        num_boxes = all_reduce_mean(num_targets.sum()).clamp(min=1)
        all_labels = torch.cat([t["labels"] for t in targets]).to(device)
        all_boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)

        matched_labels = all_labels[target_idx]
        target_classes = torch.full(
            (num_layers, batch, num_queries), self.num_classes, dtype=torch.int64, device=device
        )
        target_classes[layer_idx, batch_idx, query_idx] = matched_labels
        # the weighted mean of F.cross_entropy(weight=...), per layer
        weighted = F.cross_entropy(
            logits.flatten(0, 2), target_classes.flatten(), self.empty_weight, reduction="none"
        ).view(num_layers, -1)
        weights = self.empty_weight[target_classes].view(num_layers, -1)
        loss_ce = weighted.sum(1) / weights.sum(1)

        pred_boxes = boxes[layer_idx, batch_idx, query_idx]  # [N, 4]
        target_boxes = all_boxes[target_idx]
        per_pair = torch.stack(
            [
                (pred_boxes - target_boxes).abs().sum(-1),
                generalized_box_iou_loss(
                    box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes),
                    reduction="none",
                ),
            ]
        )  # fmt: skip
        # summed per layer from host-known counts (index_add_ would be non-deterministic on CUDA)
        if len(set(pairs_per_layer)) == 1:  # min(Q, T_i) pairs per image in every layer
            per_layer = per_pair.view(2, num_layers, -1).sum(-1)
        else:
            parts = per_pair.split(pairs_per_layer, dim=1)
            per_layer = torch.stack([part.sum(1) for part in parts], dim=1)
        # [3, L]: ce, bbox, giou of each layer (the final layer first), each the mean over the
        # query groups (group-major: the "layers" are every group's layers one after another)
        terms = torch.cat([loss_ce[None], per_layer / num_boxes])
        groups = 1 + len(outputs.get("group_outputs", ()))
        if groups > 1:
            terms = terms.view(3, groups, num_layers // groups).mean(1)
        weights = self._term_weights(terms.shape[1], terms)

        losses = _named_terms(terms)
        total = (terms * weights).sum()
        denoising = outputs.get("dn_outputs")
        if denoising is not None:
            if "loss_ce_dn" not in self.weight_dict:
                raise ValueError(
                    "the outputs have denoising queries: build the criterion with "
                    "denoising=True (DETRModule does so for such a model)"
                )
            dn_terms = self._denoising_terms(denoising, num_boxes)
            losses.update({_dn_name(name): term for name, term in _named_terms(dn_terms).items()})
            total = total + (dn_terms * weights[:, : dn_terms.shape[1]]).sum()
        if self.masks:
            if "pred_masks" not in outputs:
                raise ValueError("the criterion was built with masks=True; the outputs have no "
                                 "pred_masks (a model without the mask head?)")  # fmt: skip
            first = pairs_per_layer[0] if pairs_per_layer else 0
            mask_terms = _mask_terms(
                outputs["pred_masks"], [t["masks"] for t in targets], batch_idx[:first],
                query_idx[:first], target_idx[:first], num_boxes,
            )  # fmt: skip
            losses["loss_mask"], losses["loss_dice"] = mask_terms.unbind()
            # Python floats: no weight tensor copied to the device at every step
            total = total + (losses["loss_mask"] * self.weight_dict["loss_mask"]
                             + losses["loss_dice"] * self.weight_dict["loss_dice"])  # fmt: skip

        with torch.no_grad():  # logged only, for the final layer: its pairs come first
            first = pairs_per_layer[0] if pairs_per_layer else 0
            if first:
                matched_logits = logits[0][batch_idx[:first], query_idx[:first]]
                correct = (matched_logits.argmax(-1) == matched_labels[:first]).float().mean()
                losses["class_error"] = 100.0 * (1.0 - correct)
            else:
                losses["class_error"] = torch.tensor(100.0, device=device)
            num_predicted = (logits[0].argmax(-1) != self.num_classes).sum(1).float()
            losses["cardinality_error"] = F.l1_loss(num_predicted, num_targets)
        return losses, total

    def _denoising_terms(self, dn: dict[str, Tensor], num_boxes: Tensor) -> Tensor:
        """[3, L'] ce, bbox, giou of the denoising queries of each layer (the final first):
        every real denoising query against the ground truth it was noised from."""
        logits = dn["pred_logits"].float()  # [L', B, D, T, C+1]
        boxes = dn["pred_boxes"].float()  # [L', B, D, T, 4]
        num_layers, _, groups = logits.shape[:3]
        valid = dn["valid"][None, :, None, :].expand(logits.shape[:4]).reshape(num_layers, -1)
        valid = valid.to(logits.dtype)  # [L', B * D * T]
        labels = dn["labels"][None, :, None, :].expand(logits.shape[:4])
        ce = F.cross_entropy(logits.flatten(0, 3), labels.flatten(), reduction="none")
        loss_ce = (ce.view(num_layers, -1) * valid).sum(1) / valid.sum(1).clamp(min=1)
        target_boxes = dn["boxes"].float()[None, :, None].expand(boxes.shape)
        per_query = torch.stack(
            [
                (boxes - target_boxes).abs().sum(-1).view(num_layers, -1),
                generalized_box_iou_loss(
                    box_cxcywh_to_xyxy(boxes.reshape(-1, 4)),
                    box_cxcywh_to_xyxy(target_boxes.reshape(-1, 4)),
                    reduction="none",
                ).view(num_layers, -1),
            ]
        )  # [2, L', B * D * T]
        per_layer = (per_query * valid).sum(-1) / (num_boxes * groups)
        return torch.cat([loss_ce[None], per_layer])

    def _term_weights(self, num_layers: int, terms: Tensor) -> Tensor:
        """[3, L] weights of the terms (0 for a term without a weight), as :meth:`weighted_total`
        applies them; made once per device, dtype and number of layers."""
        key = (num_layers, terms.device, terms.dtype, tuple(self.weight_dict.items()))
        cached = self._weights_cache
        if cached is None or cached[0] != key:
            names = [
                [name + ("" if layer == 0 else f"_{layer - 1}") for layer in range(num_layers)]
                for name in ("loss_ce", "loss_bbox", "loss_giou")
            ]
            values = [[self.weight_dict.get(name, 0.0) for name in row] for row in names]
            weights = torch.tensor(values, dtype=terms.dtype, device=terms.device)
            self._weights_cache = cached = (key, weights)
        return cached[1]


def _mask_terms(
    pred_masks: Tensor,
    target_masks: Sequence[Tensor],
    batch_idx: Tensor,
    query_idx: Tensor,
    target_idx: Tensor,
    num_boxes: Tensor,
) -> Tensor:
    """[2]: sigmoid focal loss and dice loss of the matched queries' masks.

    pred_masks [B, Q, h, w] logits; target_masks per image [T_i, H_i, W_i] (bool or 0/1),
    padded here bottom/right to the largest (the batch's canvas when the data pads them so);
    the matched pairs as (image, query, index into the concatenated targets)."""
    height = max(int(m.shape[-2]) for m in target_masks)
    width = max(int(m.shape[-1]) for m in target_masks)
    padded = [
        F.pad(m.to(torch.uint8), (0, width - m.shape[-1], 0, height - m.shape[-2]))
        for m in target_masks
    ]
    targets = torch.cat(padded).to(pred_masks.device)[target_idx].flatten(1).float()  # [N, HW]
    if targets.shape[0] == 0:
        return pred_masks.float().sum().mul(0.0).expand(2)
    logits = F.interpolate(
        pred_masks[batch_idx, query_idx][:, None].float(), size=(height, width),
        mode="bilinear", align_corners=False,
    ).flatten(1)  # fmt: skip
    focal = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    probs = logits.sigmoid()
    dice = 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
    return torch.stack([focal.mean(1).sum(), dice.sum()]) / num_boxes


def _layers(outputs: dict) -> list[dict[str, Tensor]]:
    """The final layer's predictions, then the auxiliary layers'; with training-only query
    groups, the same for each further group after group 0's."""
    groups = [outputs, *outputs.get("group_outputs", ())]
    return [layer for group in groups for layer in (group, *group.get("aux_outputs", ()))]


def _named_terms(terms: Tensor) -> dict[str, Tensor]:
    """[3, L] terms by name: ``loss_ce`` (the final layer), ``loss_ce_0`` (the first), ..."""
    losses = {}
    for name, layer_terms in zip(("loss_ce", "loss_bbox", "loss_giou"), terms.unbind()):
        for layer_index, term in enumerate(layer_terms.unbind()):
            losses[name + ("" if layer_index == 0 else f"_{layer_index - 1}")] = term
    return losses


def _dn_name(name: str) -> str:
    """The denoising queries' name of a term: loss_ce -> loss_ce_dn, loss_ce_0 -> loss_ce_dn_0."""
    parts = name.split("_")
    if parts[-1].isdigit():
        return "_".join(parts[:-1]) + "_dn_" + parts[-1]
    return name + "_dn"


# SetCriterion's arguments that the model decides, not the ``loss`` config group
CRITERION_FROM_MODEL = (
    "num_classes", "matcher", "num_decoder_layers", "aux_loss", "denoising", "masks"
)  # fmt: skip


def build_criterion(
    num_classes: int,
    *,
    num_decoder_layers: int = 6,
    aux_loss: bool = True,
    denoising: bool = False,
    masks: bool = False,
    **settings: Any,
) -> SetCriterion:
    """The set criterion and its matcher from one flat set of settings: the ``loss`` config
    group's keys, which are the arguments of :class:`HungarianMatcher` (``set_cost_class``,
    ``set_cost_bbox``, ``set_cost_giou``) and the loss weights of :class:`SetCriterion`
    (``eos_coef``, ``ce_loss_coef``, ``bbox_loss_coef``, ``giou_loss_coef``, and with masks
    ``mask_loss_coef``, ``dice_loss_coef``); what is left out takes their defaults, the
    paper's. ``num_classes``, ``num_decoder_layers``, ``aux_loss``, ``denoising`` (whether it
    has denoising queries) and ``masks`` (whether it predicts masks) are the model's."""
    matcher, weights = split_keywords(
        settings, HungarianMatcher, SetCriterion, exclude=CRITERION_FROM_MODEL
    )
    return SetCriterion(
        num_classes,
        HungarianMatcher(**matcher),
        num_decoder_layers=num_decoder_layers,
        aux_loss=aux_loss,
        denoising=denoising,
        masks=masks,
        **weights,
    )
