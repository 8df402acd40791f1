"""Frozen TorchScript graphs of ResNet trunks for CPU inference, and the trunk runner that
puts them to use (:func:`enable_cpu_graphs`).

The model itself never builds a graph: :class:`~detr_lightning.models.Backbone` calls its
``trunk_runner``, if one is installed, and runs its eager modules whenever the runner returns
None. :class:`~detr_lightning.lightning.DETRModule` installs :func:`run_trunk_graph` on its
model, so evaluation, prediction and validation on a CPU run through the graphs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import operator
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..models.backbone import Backbone, fuse_frozen_batchnorm

log = logging.getLogger(__name__)

Shape = tuple[int, int, int, int]


class _Trunk(nn.Module):
    """What is traced: a backbone's :meth:`Backbone.trunk` as a module's forward."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone.trunk(images)


@dataclass
class _GraphEntry:
    weights: list[Tensor]  # copies of the trunk's tensors that the graphs were built from
    graph: Any = None  # the frozen TorchScript module for every shape, built when first needed
    static: dict[Shape, Any] = field(default_factory=dict)  # oneDNN Graph modules by shape


class InferenceGraphs:
    """Frozen TorchScript graphs of backbone trunks for CPU inference: per backbone, one for
    every shape and one per shape that it declares static.

    In eager mode every oneDNN convolution reorders its weights into oneDNN's blocked layout
    and converts its input and output between that layout and PyTorch's, at every call. A
    trunk traced, frozen and passed through ``torch.jit.optimize_for_inference`` has its frozen
    BatchNorm folded into the convolutions, weights packed once, and activations kept in the
    blocked layout from the first convolution to the last: the same arithmetic, and the
    ResNet-101 trunk alone ran 1.4x faster at 800x1066 on a 2-core CPU (2.05 vs 2.85 s; the
    whole model gains less). The graph holds no shapes (convolutions, pooling, additions and
    ReLU only), so one graph serves every image size and batch.

    The input shapes a backbone declares static (``Backbone.set_static_shapes``) get a graph
    each that oneDNN Graph compiles for that shape, fusing every convolution with its ReLU and
    residual addition (the trunk about 15% faster). Such a graph is compiled and run twice on
    zeros when its shape first comes, so that every real input of the shape goes through the
    compiled kernels; if oneDNN Graph fuses nothing there (a build without it), the shape
    stays with the general graph, with a warning.

    It is used only where it computes what the eager trunk computes: float32 CPU tensors, the
    module in eval mode, no gradient, no autocast, no forward hooks in the trunk, not while
    tracing or exporting. Its results differ from the eager trunk's by float32 rounding (about
    1e-6 relative), so whether it is used depends only on those conditions and the declared
    shapes, never on earlier calls: every image gets the same result in one process or many,
    first or last. A graph is built at the first call (about 1.6 s for ResNet-101 on 2 cores,
    0.2 s for ResNet-18) and rebuilt whenever the weights differ from those it was built from.
    Every call compares them with a copy (35 ms for ResNet-101 on 2 cores, ~1.5% of its
    forward at 800 pixels): version counters would be cheaper but miss updates such as fused
    AdamW's. Graphs live here, not on the module, so that state dicts, copies and pickles of a
    backbone are unaffected; a graph goes with its backbone, and ``backbone.train()`` drops it.
    TorchScript's oneDNN Graph switch (``torch.jit.enable_onednn_fusion``) is process-wide: each
    call holds it as its graph needs (see :func:`onednn_fusion`) and puts it back.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[Backbone, _GraphEntry] = (
            weakref.WeakKeyDictionary()
        )
        # the input shapes each backbone declared static (set_static_shapes)
        self._declared: weakref.WeakKeyDictionary[Backbone, frozenset[Shape]] = (
            weakref.WeakKeyDictionary()
        )

    def declared(self, backbone: Backbone) -> frozenset[Shape]:
        """The input shapes that ``backbone`` declared static (:func:`set_static_shapes`)."""
        return self._declared.get(backbone, frozenset())

    def declare(self, backbone: Backbone, shapes: frozenset[Shape]) -> None:
        """Make ``shapes`` the static shapes of ``backbone``; their old graphs are dropped."""
        if shapes:
            self._declared[backbone] = shapes
        else:
            self._declared.pop(backbone, None)
        self.discard_static(backbone)

    @staticmethod
    def applies(backbone: Backbone, images: Tensor) -> bool:
        """Whether the graph computes what the eager trunk would, and may be used."""
        weight = backbone.body.conv1.weight
        for tensor in (images, weight):
            if tensor.device.type != "cpu" or tensor.dtype != torch.float32:
                return False
        if backbone.training:
            return False
        if torch.is_grad_enabled() and (images.requires_grad or _needs_grad(backbone)):
            return False
        if torch.is_autocast_enabled("cpu") or not torch.backends.mkldnn.is_available():
            return False
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return False
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in backbone.body.modules())

    def get(self, backbone: Backbone, images: Tensor) -> Any:
        """A function that runs ``images`` through the graph, or None for the eager trunk."""
        if not self.applies(backbone, images):
            return None
        tensors = _trunk_tensors(backbone)
        entry = self._entries.get(backbone)
        if entry is None or not _all_equal(tensors, entry.weights):
            self._entries.pop(backbone, None)  # the old copies go before the new ones come
            copies = [tensor.detach().clone() for tensor in tensors]
            entry = self._entries[backbone] = _GraphEntry(copies)
        shape = tuple(images.shape)
        if shape in self.declared(backbone):
            if shape not in entry.static:
                entry.static[shape] = _static_trunk(backbone, shape)
            if entry.static[shape] is not None:
                return _with_onednn_fusion(entry.static[shape], True, contiguous=True)
        if entry.graph is None:
            entry.graph = _freeze_trunk(backbone)
        return _with_onednn_fusion(entry.graph, False)

    def static_shapes(self, backbone: Backbone) -> set[Shape]:
        """The shapes that ``backbone`` runs through a graph compiled for them."""
        entry = self._entries.get(backbone)
        return set() if entry is None else {s for s, g in entry.static.items() if g is not None}

    def discard(self, backbone: Backbone) -> None:
        """Drop ``backbone``'s graphs (and the weight copy they hold)."""
        self._entries.pop(backbone, None)

    def discard_static(self, backbone: Backbone) -> None:
        """Drop ``backbone``'s static-shape graphs only (its declared shapes changed)."""
        entry = self._entries.get(backbone)
        if entry is not None:
            entry.static.clear()

    def __contains__(self, backbone: Backbone) -> bool:
        """Whether a graph of ``backbone`` is held."""
        return backbone in self._entries


def _checked_shape(shape: Iterable[Any]) -> Shape:
    """``shape`` as a tuple of 4 ints [B, 3, H, W] > 0, or a ValueError naming it."""
    values = tuple(shape)
    try:
        # operator.index takes ints of any kind (numpy's, 0-dim tensors), not floats or bools
        ints = tuple(operator.index(n) for n in values if not isinstance(n, bool))
    except TypeError:
        ints = ()
    if len(ints) != 4 or len(values) != 4 or min(ints) <= 0 or ints[1] != 3:
        raise ValueError(
            f"a static shape is [batch, 3, height, width] of positive ints; got {values}"
        )
    return ints  # type: ignore[return-value]


def _trunk_tensors(backbone: Backbone) -> list[Tensor]:
    return [*backbone.body.parameters(), *backbone.body.buffers()]


def _all_equal(tensors: list[Tensor], saved: list[Tensor]) -> bool:
    return len(tensors) == len(saved) and all(map(torch.equal, tensors, saved))


def _needs_grad(backbone: Backbone) -> bool:
    return any(p.requires_grad for p in backbone.body.parameters())


class _FusionSwitch:
    """TorchScript's process-wide oneDNN Graph switch, held at one setting while graphs run.

    Calls that want the same setting run together, from any number of threads; a call that
    wants the other setting waits until they are done. The first holder records the value it
    found and the last one puts it back."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._setting: bool | None = None  # while held
        self._holders = 0
        self._found = False

    @contextlib.contextmanager
    def hold(self, enabled: bool) -> Iterator[None]:
        with self._changed:
            while self._holders and self._setting != enabled:
                self._changed.wait()
            if not self._holders:
                self._found = torch.jit.onednn_fusion_enabled()
                self._setting = enabled
                if self._found != enabled:
                    torch.jit.enable_onednn_fusion(enabled)
            self._holders += 1
        try:
            yield
        finally:
            with self._changed:
                self._holders -= 1
                if not self._holders:
                    if torch.jit.onednn_fusion_enabled() != self._found:
                        torch.jit.enable_onednn_fusion(self._found)
                    self._setting = None
                    self._changed.notify_all()


_FUSION_SWITCH = _FusionSwitch()


def onednn_fusion(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """TorchScript's process-wide oneDNN Graph switch at ``enabled`` for the ``with`` block,
    then back at the value found; thread-safe against the other graphs of this module.

    The general graph must run with it off: its oneDNN layout ops fail (``std::bad_alloc``)
    once oneDNN Graph rewrites them, as they would if a user had switched it on."""
    return _FUSION_SWITCH.hold(enabled)


@functools.cache
def onednn_graph_available() -> bool:
    """Whether this PyTorch build has oneDNN Graph: builds without it keep the switch as a
    stub that stays off, so this switches it on and reads it back."""
    if not hasattr(torch.jit, "enable_onednn_fusion") or not torch.backends.mkldnn.is_available():
        return False
    with onednn_fusion(True):
        return torch.jit.onednn_fusion_enabled()


def _with_onednn_fusion(graph: Any, enabled: bool, contiguous: bool = False) -> Any:
    """``graph`` run with the oneDNN Graph switch at ``enabled``; with ``contiguous``, on
    NCHW-contiguous images (the layout that a static-shape graph was compiled for)."""

    def run(images: Tensor) -> Tensor:
        with onednn_fusion(enabled):
            return graph(images.contiguous() if contiguous else images)

    return run


def _frozen_trace(backbone: Backbone) -> Any:
    """``backbone.trunk`` with its frozen BatchNorm folded, traced on a small example and
    frozen."""
    clone = copy.deepcopy(backbone).eval()
    clone.trunk_runner = None
    fuse_frozen_batchnorm(clone.body)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notices
        example = torch.zeros(1, 3, 64, 64)
        return torch.jit.freeze(torch.jit.trace(_Trunk(clone).eval(), example, check_trace=False))


@torch.no_grad()
def _freeze_trunk(backbone: Backbone) -> Any:
    """``backbone.trunk`` traced on a small example, frozen and optimized for inference."""
    frozen = _frozen_trace(backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.optimize_for_inference(frozen)


def _all_nodes(block: Any) -> Iterator[Any]:
    """Every node of a TorchScript graph or block, those in nested blocks included."""
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _all_nodes(inner)


def has_onednn_fusion_groups(graph: Any) -> bool:
    """Whether a TorchScript graph (e.g. ``torch.jit.last_executed_optimized_graph()``) runs
    kernels that oneDNN Graph fused."""
    return any(node.kind() == "prim::oneDNNFusionGroup" for node in _all_nodes(graph))


@torch.no_grad()
def _static_trunk(backbone: Backbone, shape: Shape) -> Any:
    """``backbone.trunk`` compiled by oneDNN Graph for inputs of ``shape``, or None (with a
    warning; the shape then takes the general graph) where it cannot be."""
    if not onednn_graph_available():
        log.warning("this PyTorch build has no oneDNN Graph; %s runs the general graph", shape)
        return None
    try:
        graph = _frozen_trace(backbone)
        zeros = torch.zeros(shape)
        with onednn_fusion(True):
            # TorchScript's profiling executor records the shapes in its first runs and
            # compiles at the next; these runs leave the compiled kernels in place for the
            # real inputs.
            for _ in range(torch._C._jit_get_num_profiled_runs() + 1):
                graph(zeros)
            optimized = torch.jit.last_executed_optimized_graph()
    except RuntimeError as error:  # a oneDNN Graph compilation or allocation failure
        log.warning(
            "oneDNN Graph failed for shape %s (%s); it runs the general graph", shape, error
        )
        return None
    if not has_onednn_fusion_groups(optimized):
        log.warning("oneDNN Graph fused nothing for shape %s; it runs the general graph", shape)
        return None
    return graph


INFERENCE_GRAPHS = InferenceGraphs()


log = logging.getLogger(__name__)


def run_trunk_graph(backbone: Backbone, images: Tensor) -> Tensor | None:
    """A :data:`~detr_lightning.models.backbone.TrunkRunner`: the trunk's features through the
    backbone's graph where it applies (:meth:`InferenceGraphs.applies`), else None (the eager
    trunk). A backbone in training mode frees its graphs and their copy of the weights, which
    training changes."""
    if backbone.training:
        INFERENCE_GRAPHS.discard(backbone)
        return None
    graph = INFERENCE_GRAPHS.get(backbone, images)
    return None if graph is None else graph(images)


def enable_cpu_graphs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the CPU inference of every :class:`Backbone` in ``model`` through its graphs
    (``enabled``), or through the eager modules always; returns ``model``."""
    for module in model.modules():
        if isinstance(module, Backbone):
            module.trunk_runner = run_trunk_graph if enabled else None
            if not enabled:
                INFERENCE_GRAPHS.discard(module)
    return model


def set_static_shapes(backbone: Backbone, shapes: Iterable[Iterable[int]]) -> None:
    """Declare the input shapes [B, 3, H, W] that CPU inference will see again and again.

    For each declared shape the trunk gets its own graph, compiled by oneDNN Graph for
    that shape: convolutions fused with their ReLU and residual additions. The ResNet-101
    trunk at 800x1066 ran about 15% faster on a 2-core AVX2 CPU (the whole model about
    10%); each shape costs a compilation and two warm-up passes at its first call (about
    6 s for ResNet-101 at 800x1066 on 2 cores) and about 200 MB. Worth it for a fixed-size
    stream (a camera, a server that resizes every image to one size), not for images of
    many sizes. An empty list goes back to the general graph for every shape. Takes effect
    where the backbone runs its graphs (:func:`enable_cpu_graphs`).

    Example: ``set_static_shapes(module.model.backbone, [(1, 3, 800, 1066)])``.
    """
    shapes = list(shapes)
    if shapes and not isinstance(shapes[0], Iterable):
        raise ValueError(
            f"set_static_shapes takes a list of shapes, e.g. [(1, 3, 800, 1066)]; got "
            f"{tuple(shapes)}: wrap a single shape in a list"
        )
    INFERENCE_GRAPHS.declare(backbone, frozenset(_checked_shape(shape) for shape in shapes))


def static_shapes(backbone: Backbone) -> frozenset[Shape]:
    """Input shapes [B, 3, H, W] that CPU inference runs through a graph compiled for that
    one shape (see :func:`set_static_shapes`); other shapes take the general graph."""
    return INFERENCE_GRAPHS.declared(backbone)
