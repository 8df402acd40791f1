"""ResNet weight files for the backbone: torchvision's ImageNet weights, found in torch's hub
cache or downloaded once with a clear error when offline, and local state-dict files.

Everything is read weights-only, and a file that does not fit the ResNet is reported with the
keys at fault and the ``backbone.name`` it seems to belong to.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from ..utils.errors import SetupError

STAGES = ("layer1", "layer2", "layer3", "layer4")  # the residual stages of a torchvision ResNet


# Blocks per stage and whether they are bottlenecks (have a conv3): tells which ResNet a state
# dict was saved from, so a mismatch error can name the backbone.name the file fits.
RESNET_LAYOUTS = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


def _imagenet_v1_url(name: str) -> str:
    if name not in RESNET_LAYOUTS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RESNET_LAYOUTS)}")
    # IMAGENET1K_V1, not DEFAULT: the DETR paper and the official checkpoints start from the V1
    # ImageNet weights; for resnet50/101 torchvision's DEFAULT is V2 (a newer training recipe).
    return torchvision.models.get_model_weights(name).IMAGENET1K_V1.url


def imagenet_weights_file(name: str) -> Path:
    """The local file in which torchvision caches the ImageNet (V1) weights of ResNet ``name``.

    ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>``, i.e. under ``$TORCH_HOME/hub``
    (default ``~/.cache/torch/hub``). Nothing is downloaded; the file may not exist.
    """
    url = _imagenet_v1_url(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def ensure_imagenet_weights(name: str) -> Path:
    """The cached ImageNet (V1) weights file of ResNet ``name``, downloaded first if missing.

    Raises SetupError, naming the URL, the file torchvision expects, its folder and the
    ``backbone.weights`` / ``backbone.pretrained`` overrides, when the file is not cached and
    cannot be downloaded (offline machine, proxy, HTTP error, full disk, bad checksum, ...).
    """
    url = _imagenet_v1_url(name)
    path = imagenet_weights_file(name)
    if path.is_file():
        return path
    # torchvision's file names end in the first hex digits of the file's SHA-256: checking them
    # as torchvision does keeps a truncated or foreign download out of the cache.
    stem = path.name.split(".", 1)[0]
    hash_prefix = stem.rsplit("-", 1)[-1] if "-" in stem else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Writes to a temporary file and renames it: an interrupted download leaves no file.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise SetupError(
            f"backbone {name} needs torchvision's ImageNet weights (backbone.pretrained=true), "
            f"but they are not cached and the download failed ({type(err).__name__}: {reason}).\n"
            f"  url:           {url}\n"
            f"  expected file: {path}\n"
            "Fix one of:\n"
            f"  - download {path.name} on a machine with network and copy it into "
            f"{path.parent}/ (the folder follows $TORCH_HOME)\n"
            f"  - backbone.weights=/path/to/{path.name}  to load a local copy\n"
            "  - backbone.pretrained=false  for a randomly initialized backbone (only sensible "
            "when all weights come from pretrained=...)"
        ) from None
    return path


def _guess_resnet(keys: list[str]) -> str | None:
    """Which torchvision ResNet a state dict's keys come from (None: none of them)."""
    blocks = []
    for stage in STAGES:
        indices = {
            int(parts[1])
            for parts in (key.split(".") for key in keys)
            if parts[0] == stage and len(parts) > 1 and parts[1].isdigit()
        }
        blocks.append(max(indices) + 1 if indices else 0)
    if not all(blocks[:3]):
        return None
    bottleneck = any(".conv3." in key for key in keys)
    for name, (layout, is_bottleneck) in RESNET_LAYOUTS.items():
        # a three-stage file (no layer4) is told apart by layer1-3 alone
        same_blocks = all(found in (expected, 0) for found, expected in zip(blocks[3:], layout[3:]))
        if is_bottleneck == bottleneck and tuple(blocks[:3]) == layout[:3] and same_blocks:
            return name
    return None


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def read_backbone_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """A torchvision ResNet state dict from ``path``, read weights-only (no code runs).

    Accepts a plain state dict or a dict holding one under "state_dict" or "model"; a leading
    "module." (DataParallel/DDP) is stripped from the keys.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"backbone weights file {path} does not exist; set backbone.weights to a torchvision "
            "ResNet state-dict file (or null to use backbone.pretrained)"
        )
    try:
        # weights_only: a pickle from an untrusted source must not be able to run code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot read backbone weights file {path} as a weights-only torch state dict "
            f"({reason}); backbone.weights must be a torchvision ResNet state dict saved with "
            "torch.save(model.state_dict(), path)"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise ValueError(
            f"backbone weights file {path} holds no state dict (a dict of parameter names to "
            "tensors, plain or under 'state_dict' or 'model'); backbone.weights must be a "
            "torchvision ResNet state dict"
        )
    return {key.removeprefix("module."): value for key, value in obj.items()}


def load_trunk(body: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> None:
    """Load a torchvision ResNet state dict into a trunk without its head (and maybe layer4).

    The BN keys (weight, bias, running_mean, running_var) fit FrozenBatchNorm2d's buffers and
    BatchNorm2d alike; "num_batches_tracked" loads only where the trunk keeps such a counter.
    """
    expected = body.state_dict()
    state = {
        key: value
        for key, value in state.items()
        if not key.startswith("fc.")  # the classification head is deleted from the trunk
        and not (key.startswith("layer4.") and not hasattr(body, "layer4"))
        and not (key.endswith(".num_batches_tracked") and key not in expected)
    }
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} (model {list(expected[k].shape)})"
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label}: {_few(keys)}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", mismatched),
            )
            if keys
        ]
        guess = _guess_resnet(list(state))
        if any(key.startswith("backbone.0.body.") for key in state):
            hint = "it looks like a whole DETR checkpoint: give it as pretrained=PATH instead"
        elif guess is None:
            hint = "it does not look like a torchvision ResNet state dict"
        elif guess != name:
            hint = f"it looks like {guess} weights: set backbone.name={guess}"
        else:
            hint = f"its layout is {name}'s, but some tensors differ"
        raise ValueError(
            f"backbone weights file {path} does not fit backbone {name} ({'; '.join(problems)}); "
            f"{hint}"
        )
    body.load_state_dict(state)
