"""ResNet backbone with frozen BatchNorm, optional DC5 dilation, and the padding mask.

Parameter names follow torchvision's ResNet (``body.conv1``, ``body.layer1.0.bn1``, ...), which
is also what the official DETR checkpoints hold under ``backbone.0.body``.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .backbone_weights import STAGES, ensure_imagenet_weights, load_trunk, read_backbone_weights

NormKind = Literal["frozen", "batch", "group"]
# (backbone, images) -> trunk features, or None for the eager trunk (see Backbone.trunk_runner)
TrunkRunner = Callable[["Backbone", Tensor], "Tensor | None"]


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
        # (scale, shift, scale as [C, 1, 1, 1]) and what they were computed from; a frozen
        # conv's folded weight likewise (see fold_into)
        self._folded: tuple[Tensor, Tensor, Tensor] | None = None
        self._folded_from: tuple | None = None
        self._folded_weight: tuple[tuple, Tensor] | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints of a trainable BatchNorm2d carry a counter that frozen BN has no use for
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """(scale, shift), each [C]: the norm is ``x * scale + shift`` per channel."""
        return self._scale_and_shift()[:2]

    def _scale_and_shift(self) -> tuple[Tensor, Tensor, Tensor]:
        """Computed when a buffer has changed (loaded, moved, written in place) and kept
        otherwise, so that a forward pass spends no operator on them; computed afresh under
        ``torch.compile``, which folds them into its graph itself."""
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        if torch.compiler.is_compiling():
            scale, shift = _scale_and_shift(*buffers, self.eps)
            return scale, shift, scale.view(-1, 1, 1, 1)
        source = (self.eps, *(_identity(t) for t in buffers))
        if None in source:
            scale, shift = _scale_and_shift(*buffers, self.eps)
            return scale, shift, scale.view(-1, 1, 1, 1)
        if self._folded is None or self._folded_from != source:
            with torch.no_grad():
                scale, shift = _scale_and_shift(*buffers, self.eps)
            self._folded, self._folded_from = (scale, shift, scale.view(-1, 1, 1, 1)), source
        return self._folded

    def fold_into(self, conv_weight: Tensor) -> Tensor:
        """The weight of the convolution whose output this norm normalizes, scaled per output
        channel: ``conv(x, fold_into(w)) + shift == norm(conv(x, w))``. Kept between calls for
        a weight that is not trained (the frozen stages), like the scale itself."""
        scale = self._scale_and_shift()[2].to(conv_weight.dtype)
        weight_source = _identity(conv_weight)
        if conv_weight.requires_grad or torch.compiler.is_compiling() or weight_source is None:
            return conv_weight * scale
        source = (weight_source, self._folded_from)
        if self._folded_weight is None or self._folded_weight[0] != source:
            with torch.no_grad():
                self._folded_weight = (source, conv_weight * scale)
        return self._folded_weight[1]

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        scale, shift = self.scale_and_shift()
        shape = (1, -1, 1, 1)
        return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _identity(tensor: Tensor) -> tuple | None:
    """What tells a tensor's contents apart without reading them: storage, in-place writes;
    None for an inference tensor, which counts no writes (nothing of it can be kept)."""
    if tensor.is_inference():
        return None
    return tensor.data_ptr(), tensor._version, tensor.dtype, tensor.device


def _scale_and_shift(
    weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    scale = weight * (var + eps).rsqrt()
    return scale, bias - mean * scale


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
        trainable_layers: how many stages, from the top, are trained (0-5; 3 = layer2-4 as
            the official recipe; 5 = everything, for training from a random backbone).
        num_stages: residual stages used: 4 (the paper, stride 32) or 3 (stops after layer3:
            stride 16 and half the channels, for small images and small machines).
        lr: learning rate of the trainable stages (the paper's 1e-5, a tenth of the
            transformer's), which the optimizer reads (the official code's ``lr_backbone``);
            0 freezes every backbone weight.

    Argument names are the ``backbone`` config group's keys; the defaults are the paper's,
    except that nothing is downloaded unless asked for (the config asks: ``pretrained``).
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        dilation: bool = False,
        weights: str | os.PathLike | None = None,
        pretrained: bool = False,
        norm: NormKind = "frozen",
        trainable_layers: int = 3,
        num_stages: int = 4,
        lr: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_stages not in (3, 4):
            raise ValueError(f"num_stages must be 3 or 4, got {num_stages}")
        if dilation and num_stages != 4:
            raise ValueError("DC5 dilates layer4; it needs num_stages=4")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in 0..5, got {trainable_layers}")
        if lr < 0:
            raise ValueError(f"backbone.lr={lr}: a learning rate >= 0 (0 freezes the backbone)")
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
        self.lr = float(lr)
        trainable = STAGES_TOP_DOWN[: trainable_layers + (trainable_layers == 5)]
        for param_name, param in self.body.named_parameters():
            if self.lr == 0.0 or not param_name.startswith(trainable):
                param.requires_grad_(False)

    # A function (backbone, images) -> features that may run the trunk another way, or return
    # None for the eager modules; None: always the eager modules. The model knows nothing of
    # such runners: ``detr_lightning.inference.graphs.enable_cpu_graphs`` installs one that
    # runs CPU inference through a frozen TorchScript graph (DETRModule does, for every model).
    trunk_runner: TrunkRunner | None = None

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Features of the last stage and the padding mask at their resolution.

        Args:
            images: [B, 3, H, W] normalized images (zero on padding).
            padding_mask: [B, H, W] bool, True on padding.
        Returns:
            features: [B, num_channels, H/stride, W/stride].
            mask: [B, H/stride, W/stride] bool, True on padding (nearest resize, as official).
        """
        x = self.trunk_runner(self, images) if self.trunk_runner is not None else None
        if x is None:
            # Eager convolutions run channels_last. On a CPU it is oneDNN's own layout, with no
            # conversion of every input and output: ResNet-101 inference at 800x1066 on 2 cores
            # took 2.26 s per image against 2.67 s from NCHW, and a training step the same.
            # cuDNN's tensor-core convolutions under mixed precision prefer it too.
            x = self.trunk(images.contiguous(memory_format=torch.channels_last))
        return x, resize_mask(padding_mask, x.shape[-2:])

    def trunk(self, images: Tensor) -> Tensor:
        """The ResNet stages: [B, 3, H, W] -> [B, num_channels, H/stride, W/stride]."""
        # the last item only: each earlier stage's output is freed as the next one runs
        return collections.deque(self._stage_outputs(images), maxlen=1)[0]

    def stages(self, images: Tensor) -> list[Tensor]:
        """Every stage's output, eager: [B, C_s, H/4, W/4] (layer1), then strides 8, 16 and
        (with 4 stages) 32, or 16 again with DC5; channels :attr:`stage_channels`. The mask
        head of the panoptic model reads the first three."""
        return list(self._stage_outputs(images))

    def _stage_outputs(self, images: Tensor) -> Iterator[Tensor]:
        body = self.body
        x = body.maxpool(F.relu(conv_norm(images, body.conv1, body.bn1), inplace=True))
        for stage in STAGES[: self.num_stages]:
            for block in getattr(body, stage):
                x = residual_block(block, x)
            yield x

    @property
    def stage_channels(self) -> list[int]:
        """Channels of :meth:`stages`' outputs: [256, 512, 1024, 2048] for ResNet-50/101,
        [64, 128, 256, 512] for ResNet-18/34 (the first ``num_stages``)."""
        last = RESNET_CHANNELS[self.name]
        return [last // 2 ** (3 - i) for i in range(self.num_stages)]


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
    weight = norm.fold_into(conv.weight)
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
