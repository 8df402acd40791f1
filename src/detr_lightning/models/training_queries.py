"""Decoder queries that exist in training only, to converge in fewer epochs while the model
that is evaluated, exported and loaded stays DETR's.

- **Query groups** (Group DETR, Chen et al. 2022, arXiv 2207.13085): ``query_groups - 1``
  more sets of object queries beside the model's own; every group is matched one-to-one to the
  ground truth on its own, and self-attention stays within each group, so each group is a
  complete DETR decoder pass that shares all weights. Inference uses the model's own queries
  (group 0).
- **Denoising queries** (DN-DETR, Li et al. 2022, arXiv 2203.01305; its vanilla-DETR variant):
  ``denoising.groups`` copies of each image's ground truth with noised labels (a label
  embedding, the query's content) and noised boxes (a linear embedding of the box, the query's
  position); they learn to reconstruct the true boxes and labels, without matching. The
  matching queries cannot see them and denoising groups cannot see each other.

The parameters of both live in :class:`TrainingQueries` (the ``training_queries.`` keys of the
model's state dict). Lightning checkpoints keep them, for an exact resume; exports and
:func:`~detr_lightning.save_pretrained` leave them out, so their layout is the official one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from ..ops.padding import target_slots
from ..ops.transfer import host_to_device

__all__ = [
    "TRAINING_ONLY_PREFIX",
    "DecoderQueries",
    "Denoising",
    "TrainingQueries",
    "without_training_queries",
]

# the state-dict keys (of DETR) of the training-only parameters
TRAINING_ONLY_PREFIX = "training_queries."


@dataclass(frozen=True)
class Denoising:
    """DN-DETR's settings (the ``model.denoising`` config key).

    Args:
        groups: noised copies of the ground truth per image and step (0: off).
        label_noise: probability that a denoising query's label is replaced by a random class.
        box_noise: each box corner moves by up to ``box_noise`` x half the box's width
            (height), uniformly, so the center shifts and the size scales.
    """

    groups: int = 0
    label_noise: float = 0.2
    box_noise: float = 0.4

    def __post_init__(self) -> None:
        if int(self.groups) != self.groups or self.groups < 0:
            raise ValueError(f"denoising.groups={self.groups}: a whole number >= 0 (0: off)")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"denoising.label_noise={self.label_noise}: a probability in [0, 1]")
        if self.box_noise < 0:
            raise ValueError(f"denoising.box_noise={self.box_noise}: must be >= 0")

    @classmethod
    def of(cls, value: Denoising | Mapping[str, Any] | None) -> Denoising:
        """The settings from a mapping (a config node), naming any unknown key."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"denoising={value!r}: a mapping such as {{groups: 5}}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"denoising: unknown key(s) {unknown}; the keys are {sorted(known)}")
        return cls(**{key: value[key] for key in value})


def without_training_queries(model_spec: Mapping[str, Any]) -> dict[str, Any]:
    """A ``model`` spec with the training-only queries off: the model that inference runs."""
    spec = dict(model_spec)
    if "query_groups" in spec:
        spec["query_groups"] = 1
    if isinstance(spec.get("denoising"), Mapping):
        spec["denoising"] = {**spec["denoising"], "groups": 0}
    return spec


@dataclass
class DecoderQueries:
    """What the decoder starts from in a training step with training-only queries.

    ``content`` and ``position`` [B, N, E] (N = groups x Q matching queries, then
    ``denoising_groups`` x ``max_targets`` denoising ones), ``blocked`` [N, N] (True: query
    i may not attend to query j) and ``padding`` [B, N] (True: a denoising slot beyond the
    image's ground truth, which no query attends to); for the loss, the ground truth the
    denoising queries reconstruct: ``labels`` [B, T], ``boxes`` [B, T, 4], ``valid`` [B, T]."""

    content: Tensor
    position: Tensor
    blocked: Tensor
    padding: Tensor | None
    groups: int
    num_queries: int
    denoising_groups: int = 0
    max_targets: int = 0
    labels: Tensor | None = None
    boxes: Tensor | None = None
    valid: Tensor | None = None


class TrainingQueries(nn.Module):
    """The training-only parameters and the queries they make (see the module's text).

    Args:
        num_queries: the model's object queries per group (Q).
        hidden_dim: the query width.
        num_classes: object classes (the denoising label embedding has one row per class).
        query_groups: groups of matching queries in training, the model's own included (1: off).
        denoising: :class:`Denoising` settings.
    """

    def __init__(
        self,
        num_queries: int,
        hidden_dim: int,
        num_classes: int,
        query_groups: int = 1,
        denoising: Denoising | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if int(query_groups) != query_groups or query_groups < 1:
            raise ValueError(f"query_groups={query_groups}: a whole number >= 1 (1: off)")
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.query_groups = int(query_groups)
        self.denoising = Denoising.of(denoising)
        if self.query_groups > 1:  # initialized as nn.Embedding's weights (the model's queries)
            self.group_queries = nn.Parameter(
                torch.randn((self.query_groups - 1) * num_queries, hidden_dim)
            )
        if self.denoising.groups:
            self.label_embed = nn.Embedding(num_classes, hidden_dim)
            self.box_embed = nn.Linear(4, hidden_dim)

    @staticmethod
    def wanted(query_groups: int, denoising: Denoising) -> bool:
        """Whether these settings ask for any training-only query."""
        return query_groups > 1 or denoising.groups > 0

    def initial_state(self, state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """Values for this module's parameters (keys with ``prefix``) when a checkpoint without
        them is loaded: every extra group starts as a copy of the checkpoint's queries
        (``query_embed.weight``); the denoising embeddings keep their initialization."""
        own = {prefix + key: value for key, value in self.state_dict().items()}
        queries = state.get("query_embed.weight")
        key = prefix + "group_queries"
        if key in own and queries is not None and queries.shape[0] == self.num_queries:
            own[key] = queries.repeat(self.query_groups - 1, 1)
        return own

    def forward(
        self, queries: Tensor, batch: int, targets: Sequence[Mapping[str, Tensor]] | None
    ) -> DecoderQueries:
        """The decoder's queries for a training step: the model's ``queries`` [Q, E] as group 0,
        the extra groups, and (with ``targets``, per image ``labels`` [T_i] and ``boxes``
        [T_i, 4] cxcywh) the denoising queries."""
        groups, num_queries = self.query_groups, self.num_queries
        matching = queries if groups == 1 else torch.cat([queries, self.group_queries])
        matching_count = groups * num_queries
        position = matching[None].expand(batch, -1, -1)
        content = torch.zeros_like(position)
        group_of = torch.arange(matching_count, device=queries.device) // num_queries
        if not self.denoising.groups:
            blocked = group_of[:, None] != group_of[None, :]
            return DecoderQueries(content, position, blocked, None, groups, num_queries)
        if targets is None:
            raise ValueError(
                "denoising queries need the batch's targets: model(images, mask, targets)"
            )
        noised = self._noised_ground_truth(targets, queries.device)
        dn_groups, max_targets = self.denoising.groups, noised["labels"].shape[1]
        valid = noised["valid"]  # [B, T]
        keep = valid.repeat(1, dn_groups)[..., None].to(queries.dtype)  # [B, D * T, 1]
        dn_content = self.label_embed(noised["noised_labels"]) * keep
        dn_position = self.box_embed(noised["noised_boxes"].to(queries.dtype)) * keep
        content = torch.cat([content, dn_content], 1)
        position = torch.cat([position, dn_position], 1)
        # groups: 0..groups-1 matching, then one per denoising group
        dn_group_of = (
            groups + torch.arange(dn_groups * max_targets, device=queries.device) // max_targets
        )
        group_of = torch.cat([group_of, dn_group_of])
        query_is_dn = group_of >= groups
        # a query sees its own group; a denoising query also sees group 0's matching queries
        blocked = group_of[:, None] != group_of[None, :]
        blocked &= ~(query_is_dn[:, None] & (group_of[None, :] == 0))
        padding = torch.cat(
            [valid.new_zeros(batch, matching_count), ~valid.repeat(1, dn_groups)], 1
        )
        return DecoderQueries(
            content, position, blocked, padding, groups, num_queries, dn_groups, max_targets,
            noised["labels"], noised["boxes"], valid,
        )  # fmt: skip

    def _noised_ground_truth(
        self, targets: Sequence[Mapping[str, Tensor]], device: torch.device
    ) -> dict[str, Tensor]:
        """Each image's ground truth padded to the batch's largest count T (at least 1, so that
        a batch without objects trains the same graph), and its noised copies, one per
        denoising group: ``labels`` [B, T], ``boxes`` [B, T, 4], ``valid`` [B, T],
        ``noised_labels`` [B, D * T], ``noised_boxes`` [B, D * T, 4] (cxcywh)."""
        sizes = [len(target["labels"]) for target in targets]
        batch, max_targets = len(sizes), max(max(sizes, default=0), 1)
        # padded slots repeat a real box (or, in a batch without any, a dummy one): finite in
        # every loss, and left out of it by ``valid``
        gather, inside = target_slots(sizes, max_targets)
        packed = host_to_device(torch.from_numpy(np.stack([gather, inside])), device)
        gather, valid = packed[0], packed[1].bool()
        if sum(sizes):
            labels = torch.cat([t["labels"] for t in targets]).to(device)[gather]
            boxes = torch.cat([t["boxes"] for t in targets]).to(device=device).float()[gather]
        else:
            labels = torch.zeros(batch, max_targets, dtype=torch.int64, device=device)
            boxes = torch.full((batch, max_targets, 4), 0.5, device=device)
        dn_groups = self.denoising.groups
        noised_labels = labels.repeat(1, dn_groups)
        noised_boxes = boxes.repeat(1, dn_groups, 1)
        if self.denoising.label_noise > 0:
            flip = torch.rand(noised_labels.shape, device=device) < self.denoising.label_noise
            random_labels = torch.randint_like(noised_labels, self.num_classes)
            noised_labels = torch.where(flip, random_labels, noised_labels)
        if self.denoising.box_noise > 0:
            corners = box_cxcywh_to_xyxy(noised_boxes)
            half_size = noised_boxes[..., 2:].repeat(1, 1, 2) / 2  # [w/2, h/2, w/2, h/2]
            shift = torch.rand_like(corners) * 2 - 1
            corners = (corners + shift * half_size * self.denoising.box_noise).clamp(0.0, 1.0)
            noised_boxes = box_xyxy_to_cxcywh(corners)
        return {
            "labels": labels,
            "boxes": boxes,
            "valid": valid,
            "noised_labels": noised_labels,
            "noised_boxes": noised_boxes,
        }
