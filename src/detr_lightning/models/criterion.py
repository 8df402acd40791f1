"""DETR's set prediction loss: Hungarian matching, then CE + L1 + GIoU on matched pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou_loss
from ..ops.distributed import all_reduce_mean
from .matcher import HungarianMatcher, Indices


class SetCriterion(nn.Module):
    """Unweighted loss terms of DETR, plus the weights to combine them.

    Terms (per decoder layer; earlier layers get the suffix ``_0``, ``_1``, ...):
    ``loss_ce`` cross-entropy over all queries, unmatched ones labelled "no object" with weight
    ``eos_coef``; ``loss_bbox`` L1 and ``loss_giou`` 1 - GIoU over matched pairs, both divided by
    the number of target boxes averaged over all ranks. ``class_error`` (top-1 error in % on
    matched queries) and ``cardinality_error`` (|#predicted objects - #targets|) are logged only.

    Args:
        num_classes: object classes (without no-object).
        matcher: assigns predictions to targets.
        eos_coef: relative weight of the no-object class in ``loss_ce``.
        ce_loss_coef, bbox_loss_coef, giou_loss_coef: weights in :attr:`weight_dict`.
        num_decoder_layers: with ``aux_loss``, weights get one suffixed copy per earlier layer.
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
        if aux_loss:
            for i in range(num_decoder_layers - 1):
                self.weight_dict.update({f"{k}_{i}": v for k, v in base.items()})

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """Sum of ``weight * term`` over the terms that have a weight."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)

    def forward(self, outputs: dict, targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Compute every loss term.

        Args:
            outputs: the model's dict (``pred_logits`` [B,Q,C+1], ``pred_boxes`` [B,Q,4],
                optional ``aux_outputs``).
            targets: per image ``labels`` int64 [T] in [0, num_classes) and ``boxes`` [T, 4]
                cxcywh normalized to the unpadded image.
        Returns:
            unweighted terms (scalars); combine with :attr:`weight_dict` or :meth:`weighted_total`.
        """
        # Labels are not checked here: that would cost a host sync per step. The dataset checks
        # them against its label map once, and DETRModule.setup the map against num_classes.
        layers = [outputs] + list(outputs.get("aux_outputs", []))
        all_indices = self.matcher.match_layers(layers, targets)

        device = outputs["pred_logits"].device
        num_boxes = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        num_boxes = all_reduce_mean(num_boxes).clamp(min=1)

        losses = {}
        for layer_index, (layer, indices) in enumerate(zip(layers, all_indices)):
            suffix = "" if layer_index == 0 else f"_{layer_index - 1}"
            terms = self._layer_losses(layer, targets, indices, num_boxes, logged=layer_index == 0)
            losses.update(
                {k + (suffix if k.startswith("loss") else ""): v for k, v in terms.items()}
            )
        return losses

    def _layer_losses(
        self,
        outputs: dict[str, Tensor],
        targets: Sequence[dict[str, Tensor]],
        indices: Indices,
        num_boxes: Tensor,
        logged: bool,
    ) -> dict[str, Tensor]:
        logits = outputs["pred_logits"].float()
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(
            device
        )
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        matched_labels = torch.cat(
            [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)]
        ).to(device)

        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=device
        )
        target_classes[batch_idx, query_idx] = matched_labels
        losses = {
            "loss_ce": F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight)
        }

        pred_boxes = outputs["pred_boxes"][batch_idx, query_idx].float()
        target_boxes = torch.cat(
            [t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, indices)]
        ).to(device=device, dtype=torch.float32)
        losses["loss_bbox"] = F.l1_loss(pred_boxes, target_boxes, reduction="sum") / num_boxes
        losses["loss_giou"] = (
            generalized_box_iou_loss(
                box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes), reduction="sum"
            )
            / num_boxes
        )

        if logged:
            with torch.no_grad():
                matched_logits = logits[batch_idx, query_idx]
                if matched_labels.numel():
                    correct = (matched_logits.argmax(-1) == matched_labels).float().mean()
                    losses["class_error"] = 100.0 * (1.0 - correct)
                else:
                    losses["class_error"] = torch.tensor(100.0, device=device)
                num_predicted = (logits.argmax(-1) != self.num_classes).sum(1).float()
                num_targets = torch.tensor(
                    [float(len(t["labels"])) for t in targets], device=device
                )
                losses["cardinality_error"] = F.l1_loss(num_predicted, num_targets)
        return losses
