"""Copy a state dict into a model, or fail with one error that lists every mismatch."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from ..models.training_queries import TRAINING_ONLY_PREFIX
from ..utils.errors import CheckpointError

log = logging.getLogger(__name__)

CLASS_HEAD_KEYS = ("class_embed.weight", "class_embed.bias")


def load_state_into(
    model: torch.nn.Module,
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    reinit_class_head: bool = False,
) -> None:
    """Copy ``state`` into ``model`` (our key names), or raise one error listing every problem.

    With ``reinit_class_head`` the classifier keeps its fresh initialization. Everything is
    checked before anything is copied: ``load_state_dict(strict=False)`` would copy the
    tensors that fit and report the others afterwards, leaving a half-loaded model behind the
    error (and it raises on the first shape mismatch, without the list).
    """
    own = model.state_dict()
    state = _with_training_queries(model, own, state, path)
    skip = set(CLASS_HEAD_KEYS) if reinit_class_head else set()
    # BatchNorm's step counters are dropped on reading (the official and Hugging Face files
    # have none; they change no output): the model keeps its own
    skip |= {k for k in own if k.endswith("num_batches_tracked") and k not in state}
    missing = sorted(k for k in own if k not in state and k not in skip)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and k not in skip and state[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        lines = [f"{path}: checkpoint does not fit the model"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                shown = ", ".join(items[:8]) + (
                    f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                )
                lines.append(f"  {title} ({len(items)}): {shown}")
        norm = _norm_hint(missing, unexpected)
        if norm:
            lines.append(f"  {norm}")
        lines.append(
            "  Check the backbone/dilation/layer settings; only the class head may differ "
            "(pass num_classes to re-initialize it)."
        )
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for key, value in own.items():
            if key not in skip:
                value.copy_(state[key])


def _with_training_queries(
    model: torch.nn.Module, own: Mapping[str, Tensor], state: Mapping[str, Tensor], path
) -> Mapping[str, Tensor]:
    """``state`` fitted to the model's training-only queries: a checkpoint without them (the
    official and Hugging Face ones, exports) gets their initial values (every extra query
    group a copy of the checkpoint's queries); a checkpoint with them, loaded into a model
    without, has them left out. A checkpoint with other training-only queries than the
    model's is a mismatch, reported as such."""
    ours = [k for k in own if k.startswith(TRAINING_ONLY_PREFIX)]
    theirs = [k for k in state if k.startswith(TRAINING_ONLY_PREFIX)]
    if theirs and not ours:
        log.info("%s: leaving out its %d training-only tensors (%s...)", path, len(theirs),
                 theirs[0])  # fmt: skip
        return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIX)}
    if ours and not theirs:
        queries = getattr(model, "training_queries", None)
        if queries is None:
            return state
        log.info("%s has no training-only queries: the extra query groups start as copies of "
                 "its queries", path)  # fmt: skip
        return {**state, **queries.initial_state(state, TRAINING_ONLY_PREFIX)}
    return state


def _norm_hint(missing: list[str], unexpected: list[str]) -> str | None:
    """What the backbone's normalization buffers among the problems say: the checkpoint was
    trained with another ``backbone.norm`` than the model's (frozen, batch or group)."""
    if any(k.startswith("backbone.") and k.endswith(".num_batches_tracked") for k in unexpected):
        return "the checkpoint's backbone has trainable BatchNorm: set backbone.norm=batch"
    if any(k.startswith("backbone.") and k.endswith(".running_mean") for k in unexpected):
        return (
            "the checkpoint's backbone has BatchNorm statistics and the model's none: set "
            "backbone.norm=frozen (or batch)"
        )
    if any(k.startswith("backbone.") and k.endswith(".running_mean") for k in missing):
        return "the checkpoint's backbone has no BatchNorm statistics: set backbone.norm=group"
    return None
