"""Training forward and backward passes replayed from one CUDA graph per batch shape.

A captured graph launches a whole forward (or backward) pass with one call, so the host no
longer issues thousands of kernels one by one; it holds for one input shape only. With
``data.pad_to`` an epoch has a few padded batch shapes, and :class:`CapturedSteps` captures
each of them once it has run eagerly ``warmup`` times (cuDNN's autotuning, the allocator's
pools and the kernels' lazy initialisation settle first) and replays it afterwards. A shape
beyond ``max_shapes`` (a batch that fits no canvas, the epoch's short last batch when there are
already as many graphs) runs eagerly: a clean fallback, counted, with a warning when captures
keep coming, since capturing is only worth it when shapes repeat.

The criterion (matching on the host, the set loss) stays eager; the graph covers the model from
the padded images to its stacked predictions. Only for CUDA: elsewhere the run stays eager,
with a warning. Opt-in (``capture=true`` in the training config) until GPU measurements show
the gain; see ``bench/train_step.py``.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.errors import SetupError

log = logging.getLogger(__name__)

__all__ = ["CapturedSteps", "capture_settings"]

# the graphed callable: (images, padding_mask) -> the model's outputs as a flat tuple
Capture = Callable[[nn.Module, tuple[Tensor, ...]], Callable[..., tuple[Tensor, ...]]]


def capture_settings(setting: Any) -> dict[str, Any] | None:
    """The ``capture`` config key as :class:`CapturedSteps`' arguments: false/null: None (no
    capture); true: the defaults; a mapping: ``warmup`` and ``max_shapes``."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if isinstance(setting, Mapping) and set(setting) <= {"warmup", "max_shapes"}:
        return {key: int(value) for key, value in setting.items()}
    raise SetupError(
        f"capture={setting!r}: use false, true, or {{warmup: 3, max_shapes: 16}} (eager runs "
        "of a shape before it is captured, and how many shapes get a graph)"
    )


class _FlatOutputs(nn.Module):
    """The model with its outputs as a flat tuple of tensors, as a graph returns them:
    ``pred_logits``, ``pred_boxes``, then each auxiliary layer's two."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, ...]:
        outputs = self.model(images, padding_mask)
        flat = [outputs["pred_logits"], outputs["pred_boxes"]]
        for layer in outputs.get("aux_outputs", []):
            flat += [layer["pred_logits"], layer["pred_boxes"]]
        return tuple(flat)


def _nested(flat: tuple[Tensor, ...]) -> dict[str, Any]:
    outputs: dict[str, Any] = {"pred_logits": flat[0], "pred_boxes": flat[1]}
    if len(flat) > 2:
        outputs["aux_outputs"] = [
            {"pred_logits": flat[i], "pred_boxes": flat[i + 1]} for i in range(2, len(flat), 2)
        ]
    return outputs


class CapturedSteps:
    """Calls ``model(images, padding_mask)`` in training, through a graph per batch shape.

    Args:
        model: the DETR model (outputs as :meth:`~detr_lightning.models.DETR.forward`).
        warmup: eager calls of a shape before it is captured.
        max_shapes: shapes that get a graph; later shapes run eagerly.
        capture: makes the graphed callable of a module for sample inputs (by default
            ``torch.cuda.make_graphed_callables``, which also captures the backward pass).
        churn_steps: a warning when that many calls in a row each captured a new shape.

    ``captures``, ``replays`` and ``eager`` count the calls of each kind; ``fallbacks`` the
    eager calls of shapes that got no graph because ``max_shapes`` was reached.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        warmup: int = 3,
        max_shapes: int = 16,
        capture: Capture | None = None,
        churn_steps: int = 4,
    ) -> None:
        if warmup < 1 or max_shapes < 1:
            raise SetupError(
                f"capture: warmup={warmup} and max_shapes={max_shapes} must both be at least 1"
            )
        trainable_stats = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
        ]
        if trainable_stats:
            raise SetupError(
                "capture replays fixed graphs, but BatchNorm layers that track running "
                f"statistics ({trainable_stats[0]}, ...) would update them in every capture "
                "run too: use backbone.norm=frozen (the paper's) or group, or capture=false"
            )
        self.model = model
        self.flat = _FlatOutputs(model)
        self.warmup = warmup
        self.max_shapes = max_shapes
        self.capture = capture if capture is not None else _make_graphed_callables
        self.graphs: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}
        self.runs: Counter[tuple] = Counter()  # eager runs per shape
        self.captures = self.replays = self.eager = self.fallbacks = 0
        self._recent: deque[bool] = deque(maxlen=churn_steps)
        self._warned: set[str] = set()

    def __call__(self, images: Tensor, padding_mask: Tensor) -> dict[str, Any]:
        if not self.model.training or not torch.is_grad_enabled():
            return self.model(images, padding_mask)  # evaluation: eager, any shape
        key = _shape_key(images, padding_mask)
        graph = self.graphs.get(key)
        captured = False
        if graph is None and self.runs[key] >= self.warmup and len(self.graphs) < self.max_shapes:
            graph = self.graphs[key] = self.capture(self.flat, (images, padding_mask))
            self.captures += 1
            captured = True
            log.info("captured the training graphs of batch shape %s", tuple(images.shape))
        self._note(captured)
        if graph is not None:
            self.replays += not captured
            return _nested(graph(images, padding_mask))
        self.runs[key] += 1
        self.eager += 1
        if len(self.graphs) >= self.max_shapes:
            self.fallbacks += 1
            self._warn_once(
                "max_shapes",
                f"batch shape {tuple(images.shape)} runs eagerly: capture.max_shapes="
                f"{self.max_shapes} graphs exist already. Fewer shapes (data.pad_to with a "
                "coarser step or fewer canvases) let every batch replay a graph",
            )
        return self.model(images, padding_mask)

    def _note(self, captured: bool) -> None:
        self._recent.append(captured)
        if len(self._recent) == self._recent.maxlen and all(self._recent):
            self._warn_once(
                "churn",
                f"a new batch shape was captured at each of the last {len(self._recent)} "
                "steps: captures cost more than they save unless shapes repeat. Set data.pad_to "
                "(a step such as 128, or a list of canvases), or capture=false",
            )

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            log.warning(message)


def _shape_key(images: Tensor, padding_mask: Tensor) -> tuple:
    """What a graph is specific to: shapes, dtypes, device, and the autocast in force."""
    device = images.device.type
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    return (tuple(images.shape), images.dtype, tuple(padding_mask.shape), images.device, autocast)


def _make_graphed_callables(
    module: nn.Module, sample: tuple[Tensor, ...]
) -> Callable[..., tuple[Tensor, ...]]:
    # autocast's cast cache must be off inside a captured region (torch's documented rule)
    with torch.autocast("cuda", cache_enabled=False, enabled=torch.is_autocast_enabled("cuda")):
        return torch.cuda.make_graphed_callables(module, sample)


def install_capture(module: Any, setting: Any) -> CapturedSteps | None:
    """Give the DETRModule ``module`` a :class:`CapturedSteps` for its training steps when
    ``setting`` (the ``capture`` config key) asks for one and the run trains on CUDA; on
    another device the run stays eager, with a warning."""
    options = capture_settings(setting)
    if options is None:
        module.captured_steps = None
        return None
    if getattr(module.model, "training_queries", None) is not None:
        raise SetupError(
            f"capture={setting!r} with training-only queries (model.query_groups > 1 or "
            "model.denoising.groups > 0): their outputs are not captured yet; use capture=false"
        )
    if module.device.type != "cuda":
        log.warning(
            "capture=%s: CUDA graphs need a CUDA device; this run trains on %s, eagerly",
            setting, module.device.type,
        )  # fmt: skip
        module.captured_steps = None
        return None
    module.captured_steps = CapturedSteps(module.model, **options)
    return module.captured_steps
