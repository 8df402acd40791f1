"""Hungarian matching between predictions and ground-truth boxes.

The cost of assigning query i to target j is
``set_cost_class * -p_i(c_j) + set_cost_bbox * |b_i - b_j|_1 + set_cost_giou * -GIoU(b_i, b_j)``
(boxes in normalized cxcywh for L1, xyxy for GIoU). Every image and decoder layer gets its own
[Q, T] matrix; all of them are built in one batched pass on the model's device, always in fp32,
moved to the host once, and solved with scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..ops.boxes import batched_generalized_box_iou, box_cxcywh_to_xyxy
from ..ops.padding import target_slots
from ..ops.transfer import host_to_device

Indices = list[tuple[Tensor, Tensor]]  # per image: (query indices, target indices), int64


class NonFiniteCostError(ValueError):
    """The matching cost has NaN/Inf: the predictions are not finite."""


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimizing the weighted class + L1 + GIoU cost.

    The weights' names are the official code's options (``--set_cost_class`` ...) and the
    ``loss`` config group's keys; the defaults are the paper's.
    """

    def __init__(
        self, set_cost_class: float = 1.0, set_cost_bbox: float = 5.0, set_cost_giou: float = 2.0
    ) -> None:
        super().__init__()
        if set_cost_class == 0 and set_cost_bbox == 0 and set_cost_giou == 0:
            raise ValueError("all matching costs are 0; at least one must be non-zero")
        self.set_cost_class = set_cost_class
        self.set_cost_bbox = set_cost_bbox
        self.set_cost_giou = set_cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]]) -> Indices:
        """Match one set of predictions.

        Args:
            outputs: ``pred_logits`` [B, Q, C+1] and ``pred_boxes`` [B, Q, 4] (cxcywh, normalized).
            targets: per image ``labels`` int64 [T_i] and ``boxes`` [T_i, 4] (cxcywh, normalized).
        Returns:
            per image (query_idx, target_idx), each int64 [min(Q, T_i)] on the CPU.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(
        self, layers: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> list[Indices]:
        """Match several prediction sets (e.g. every decoder layer) against the same targets."""
        return [
            [(torch.from_numpy(rows), torch.from_numpy(cols)) for rows, cols in layer]
            for layer in self.assign_layers(layers, targets)
        ]

    @torch.no_grad()
    def assign_layers(
        self, layers: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """:meth:`match_layers` with numpy int64 index arrays, as the solver gives them: what
        :class:`~detr_lightning.models.criterion.SetCriterion` takes without a tensor per
        image and layer."""
        logits = torch.stack([layer["pred_logits"] for layer in layers])  # [L, B, Q, C+1]
        num_layers, batch, num_queries = logits.shape[:3]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} predictions")
        sizes = [len(target["labels"]) for target in targets]
        empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
        max_targets = max(sizes, default=0)
        if max_targets == 0:
            return [[empty] * batch for _ in range(num_layers)]

        device = logits.device
        # Targets padded to [B, T_max] by one gather from their concatenation (the padded
        # columns repeat target 0 and are cut off before solving).
        gather, _ = target_slots(sizes, max_targets)
        gather = host_to_device(torch.from_numpy(gather), device)
        labels = torch.cat([target["labels"] for target in targets])[gather]  # [B, T_max]
        boxes = torch.cat([target["boxes"] for target in targets])[gather].float()

        with torch.autocast(device_type=device.type, enabled=False):
            prob = logits.float().softmax(-1)  # [L, B, Q, C+1]
            pred_boxes = torch.stack([layer["pred_boxes"] for layer in layers]).float()
            index = labels[None, :, None, :].expand(num_layers, batch, num_queries, max_targets)
            cost = -self.set_cost_class * prob.gather(-1, index)
            cost += self.set_cost_bbox * (
                pred_boxes.unsqueeze(-2) - boxes[None, :, None]
            ).abs().sum(-1)
            cost -= self.set_cost_giou * batched_generalized_box_iou(
                box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(boxes)[None]
            )
        cost = cost.cpu().numpy()  # the one device-to-host transfer
        if not np.isfinite(cost).all():  # checked on the host copy: no operator, no wait
            raise NonFiniteCostError(
                "matching cost has NaN/Inf: the model produced non-finite predictions "
                "(diverged training: lower the learning rate or check the input data)"
            )
        result = []
        for layer_cost in cost:
            layer_indices = []
            for i, size in enumerate(sizes):
                if size == 0:
                    layer_indices.append(empty)
                    continue
                rows, cols = linear_sum_assignment(layer_cost[i, :, :size])
                layer_indices.append((rows.astype(np.int64), cols.astype(np.int64)))
            result.append(layer_indices)
        return result
