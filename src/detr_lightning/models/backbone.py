"""ResNet backbone with frozen BatchNorm, optional DC5 dilation, and the padding mask.

Parameter names follow torchvision's ResNet (``body.conv1``, ``body.layer1.0.bn1``, ...), which
is also what the official DETR checkpoints hold under ``backbone.0.body``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import operator
import os
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .backbone_weights import STAGES, ensure_imagenet_weights, load_trunk, read_backbone_weights

NormKind = Literal["frozen", "batch", "group"]
Shape = tuple[int, int, int, int]

log = logging.getLogger(__name__)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, none trained).

    Same buffers and epsilon as ``torchvision.ops.FrozenBatchNorm2d`` (and the official DETR
    checkpoints), computed as one fused multiply-add over the activations instead of two passes.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints of a trainable BatchNorm2d carry a counter that frozen BN has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        scale, shift = self.scale_and_shift()
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# Trainable stages counted from the top, as torchvision's ``trainable_backbone_layers``:
# 3 (the official recipe) trains layer2-4 and keeps the stem and layer1 frozen.
STAGES_TOP_DOWN = ("layer4", "layer3", "layer2", "layer1", "conv1", "bn1")


def _norm_layer(norm: NormKind):
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        # 32 groups as in "Group Normalization" (Wu & He); used when training from scratch.
        # A partial, not a lambda: torchvision keeps it on the ResNet, which must pickle
        # (ddp_spawn sends the model to its ranks that way).
        return functools.partial(nn.GroupNorm, 32)
    raise ValueError(f"backbone norm must be one of 'frozen', 'batch', 'group'; got {norm!r}")


class Backbone(nn.Module):
    """torchvision ResNet trunk returning the last feature map and the resized padding mask.

    Args:
        name: resnet18, resnet34, resnet50 or resnet101.
        dilation: DC5 variant: dilate the last stage instead of striding (output stride 16
            instead of 32). Only for the bottleneck ResNets (50/101).
        weights: a local torchvision ResNet state-dict file (e.g. a copy of torchvision's
            ImageNet weights) to initialize the trunk from; takes precedence over
            ``pretrained``. Read weights-only; "fc.*" keys are ignored.
        pretrained: without ``weights``, load torchvision's ImageNet (V1) weights from its
            cache, downloading them once (see ``ensure_imagenet_weights``; a SetupError when
            offline). Neither given: random initialization.
        norm: "frozen" (FrozenBatchNorm2d, the official choice), "batch" or "group".
        train_backbone: when False every backbone parameter is frozen.
        trainable_layers: how many stages, from the top, are trained (0-5; 3 = layer2-4 as
            the official recipe; 5 = everything, for training from a random backbone).
        num_stages: residual stages used: 4 (the paper, stride 32) or 3 (stops after layer3:
            stride 16 and half the channels, for small images and small machines).
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        dilation: bool = False,
        weights: str | os.PathLike | None = None,
        pretrained: bool = False,
        norm: NormKind = "frozen",
        train_backbone: bool = True,
        trainable_layers: int = 3,
        num_stages: int = 4,
    ) -> None:
        super().__init__()
        if num_stages not in (3, 4):
            raise ValueError(f"num_stages must be 3 or 4, got {num_stages}")
        if dilation and num_stages != 4:
            raise ValueError("DC5 dilates layer4; it needs num_stages=4")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNET_CHANNELS)}")
        if dilation and RESNET_CHANNELS[name] == 512:
            raise ValueError(
                f"DC5 dilation needs a bottleneck ResNet (resnet50/resnet101); {name} has basic "
                "blocks that torchvision cannot dilate. Set backbone.dilation=false."
            )
        if weights == "":
            weights = None  # what an empty Hydra override (backbone.weights=) gives
        # Refused before any download: GroupNorm has no slot for the running statistics.
        if norm == "group" and (weights is not None or pretrained):
            given = f"backbone.weights={weights}" if weights is not None else "backbone.pretrained"
            raise ValueError(
                f"backbone.norm=group cannot load {given}: ImageNet BatchNorm statistics cannot "
                "be loaded into GroupNorm. Use backbone.norm=frozen or batch, or train from a "
                "random backbone (backbone.pretrained=false, backbone.weights=null)"
            )
        if weights is not None:
            source: Path | None = Path(weights).expanduser()
        else:
            # Never torchvision's own download path: ensure_imagenet_weights fails with a message
            # that says how to fix an offline machine, wherever the backbone is built.
            source = ensure_imagenet_weights(name) if pretrained else None
        state = read_backbone_weights(source) if source is not None else None
        body = getattr(torchvision.models, name)(
            weights=None,
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=_norm_layer(norm),
        )
        # Classification head is never used; dropping it keeps the state dict official-shaped.
        del body.fc, body.avgpool
        if num_stages == 3:
            del body.layer4
        if state is not None:
            load_trunk(body, state, source, name)
        self.body = body
        self.name = name
        self.dilation = dilation
        self.num_stages = num_stages
        self.num_channels = RESNET_CHANNELS[name] // (2 if num_stages == 3 else 1)
        self.stride = 16 if dilation or num_stages == 3 else 32
        trainable = STAGES_TOP_DOWN[: trainable_layers + (trainable_layers == 5)]
        for param_name, param in self.body.named_parameters():
            if not train_backbone or not param_name.startswith(trainable):
                param.requires_grad_(False)

    # CPU inference through a frozen TorchScript graph of the trunk (see InferenceGraphs);
    # False: always the eager modules.
    inference_graph: bool = True
    _static_shapes: frozenset[Shape] = frozenset()

    @property
    def static_shapes(self) -> frozenset[Shape]:
        """Input shapes [B, 3, H, W] that CPU inference runs through a graph compiled for that
        one shape (see :meth:`set_static_shapes`); other shapes take the general graph."""
        return self._static_shapes

    def set_static_shapes(self, shapes: Iterable[Iterable[int]]) -> None:
        """Declare the input shapes [B, 3, H, W] that CPU inference will see again and again.

        For each declared shape the trunk gets its own graph, compiled by oneDNN Graph for
        that shape: convolutions fused with their ReLU and residual additions. The ResNet-101
        trunk at 800x1066 ran about 15% faster on a 2-core AVX2 CPU (the whole model about
        10%); each shape costs a compilation and two warm-up passes at its first call (about
        6 s for ResNet-101 at 800x1066 on 2 cores) and about 200 MB. Worth it for a fixed-size
        stream (a camera, a server that resizes every image to one size), not for images of
        many sizes. An empty list goes back to the general graph for every shape.

        Example: ``backbone.set_static_shapes([(1, 3, 800, 1066)])``.
        """
        shapes = list(shapes)
        if shapes and not isinstance(shapes[0], Iterable):
            raise ValueError(
                f"set_static_shapes takes a list of shapes, e.g. [(1, 3, 800, 1066)]; got "
                f"{tuple(shapes)}: wrap a single shape in a list"
            )
        self._static_shapes = frozenset(_checked_shape(shape) for shape in shapes)
        INFERENCE_GRAPHS.discard_static(self)

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Features of the last stage and the padding mask at their resolution.

        Args:
            images: [B, 3, H, W] normalized images (zero on padding).
            padding_mask: [B, H, W] bool, True on padding.
        Returns:
            features: [B, num_channels, H/stride, W/stride].
            mask: [B, H/stride, W/stride] bool, True on padding (nearest resize, as official).
        """
        graph = INFERENCE_GRAPHS.get(self, images) if self.inference_graph else None
        if graph is not None:
            x = graph(images)
        else:
            # Eager convolutions run channels_last. On a CPU it is oneDNN's own layout, with no
            # conversion of every input and output: ResNet-101 inference at 800x1066 on 2 cores
            # took 2.26 s per image against 2.67 s from NCHW, and a training step the same.
            # cuDNN's tensor-core convolutions under mixed precision prefer it too.
            x = self.trunk(images.contiguous(memory_format=torch.channels_last))
        return x, resize_mask(padding_mask, x.shape[-2:])

    def train(self, mode: bool = True) -> Backbone:
        if mode:  # weights change in training: free the inference graph's copy of them
            INFERENCE_GRAPHS.discard(self)
        return super().train(mode)

    def trunk(self, images: Tensor) -> Tensor:
        """The ResNet stages: [B, 3, H, W] -> [B, num_channels, H/stride, W/stride]."""
        body = self.body
        x = body.maxpool(F.relu(conv_norm(images, body.conv1, body.bn1), inplace=True))
        for stage in STAGES[: self.num_stages]:
            for block in getattr(body, stage):
                x = residual_block(block, x)
        return x


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
        if shape in backbone.static_shapes:
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
    clone.inference_graph = False
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


def conv_norm(x: Tensor, conv: nn.Conv2d, norm: nn.Module) -> Tensor:
    """``norm(conv(x))``; a FrozenBatchNorm2d is folded into the convolution instead.

    Frozen statistics make the norm an affine map per output channel, so it equals a conv with
    weights scaled per channel plus a bias: one pass over the activations fewer, forward and
    backward, and one activation tensor less kept for the backward. Gradients reach the conv
    weights through the (weight-sized) scaling, so this holds in training too.
    """
    if isinstance(norm, FrozenBatchNorm2d):
        weight, bias = folded_conv(conv, norm)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return norm(conv(x))


def folded_conv(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> tuple[Tensor, Tensor]:
    """The weight and bias of the one convolution that computes ``norm(conv(x))``."""
    scale, shift = norm.scale_and_shift()
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return weight, shift


def residual_block(block: nn.Module, x: Tensor) -> Tensor:
    """One torchvision ResNet block (BasicBlock or Bottleneck) with :func:`conv_norm`."""
    if isinstance(block, Bottleneck):
        out = F.relu(conv_norm(x, block.conv1, block.bn1), inplace=True)
        out = F.relu(conv_norm(out, block.conv2, block.bn2), inplace=True)
        out = conv_norm(out, block.conv3, block.bn3)
    elif isinstance(block, BasicBlock):
        out = F.relu(conv_norm(x, block.conv1, block.bn1), inplace=True)
        out = conv_norm(out, block.conv2, block.bn2)
    else:
        return block(x)
    identity = x if block.downsample is None else conv_norm(x, *block.downsample)
    return F.relu(out + identity, inplace=True)


def resize_mask(padding_mask: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of a [B, H, W] bool mask to [B, h, w]."""
    return F.interpolate(padding_mask[None].float(), size=tuple(size)).to(torch.bool)[0]


@torch.no_grad()
def bf16_inference_backbone(backbone: Backbone) -> Backbone:
    """A copy of ``backbone`` for inference under bfloat16 autocast, its per-call weight work
    done once: each frozen BatchNorm folded into its convolution and the convolutions' weights
    and biases stored in bfloat16.

    Under autocast the backbone folds every frozen BN into its conv at every call (in float32,
    see :func:`conv_norm`) and autocast then casts the folded weights to bfloat16: three passes
    over the trunk's weights (ResNet-101: 42M) per call, about 7% of a bf16 ResNet-101
    inference at 800x1066 on a 16-core AMX CPU. The copy holds the result of that work. It
    folds with the same float32 arithmetic and rounds to bfloat16 as autocast does, so under
    CPU bfloat16 autocast it returns exactly what ``backbone`` returns there. Without autocast
    its bfloat16 weights do not take float32 images: it is for autocast only. The original is
    left as it is (the copy costs its float32 weights for a moment, then half of them).
    """
    clone = copy.deepcopy(backbone).eval()
    trunk = getattr(clone, "body", clone)  # the ResNet; any other backbone module as a whole
    fuse_frozen_batchnorm(trunk)
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            module.to(torch.bfloat16)
    return clone.requires_grad_(False)


@torch.no_grad()
def fuse_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every FrozenBatchNorm2d that follows a bias-free conv into that conv (in place).

    For inference only: the result computes the same function with fewer passes over memory,
    but its state dict no longer matches checkpoints (convs gain a bias, the norms vanish).
    """
    for parent in list(module.modules()):
        pairs: list[tuple[str, str]] = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        if isinstance(parent, nn.Sequential) and len(parent) == 2:
            pairs.append(("0", "1"))
        for conv_name, norm_name in pairs:
            conv = getattr(parent, conv_name, None)
            norm = getattr(parent, norm_name, None)
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d)):
                continue
            weight, bias = folded_conv(conv, norm)
            conv.weight.copy_(weight)
            if conv.bias is None:
                conv.bias = nn.Parameter(bias, requires_grad=False)
            else:
                conv.bias.copy_(bias)
            setattr(parent, norm_name, nn.Identity())
    return module
