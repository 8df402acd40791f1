"""Load DETR weights from the official, Hugging Face and detr-lightning formats; export ours.

Supported inputs of :func:`load_pretrained`:

1. Official checkpoints (``torch.save({"model": state_dict, ...})``, e.g.
   ``detr-r50-e632da11.pth``, ``detr-r101-dc5-a2e86def.pth``) and the panoptic ones
   (``detr.``-prefixed; their mask head is left out).
2. Hugging Face checkpoints as on the Hub (``facebook/detr-resnet-50``): a directory with
   ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, or one of those files with
   ``config.json`` beside it. Key names are the ones ``save_pretrained`` writes.
3. detr-lightning's own Lightning checkpoints (``*.ckpt``) and :func:`export` directories.

Everything is read with ``weights_only=True`` or safetensors: a checkpoint cannot run code.
Architecture settings (depth, classes, queries, layers) are inferred from the weights; DC5
dilation, which leaves no trace in the weights, comes from the Hugging Face config, our config,
or a ``dc5`` in an official file's name, unless ``dilation`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.coco_names import COCO_CATEGORY_NAMES
from ..data.labels import LabelMap
from ..utils.errors import CheckpointError
from .architecture import infer_model_config
from .huggingface import from_huggingface, hf_model_config
from .legacy import upgrade_module_hparams
from .official import from_official
from .panoptic import split_panoptic

log = logging.getLogger(__name__)


EXPORT_FORMAT = "detr-lightning"


EXPORT_VERSION = 1


WEIGHTS_FILE = "model.safetensors"


CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------------- reading
def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` onto the CPU that never unpickles code (argparse.Namespace, the official
    ``args``, allowed); a refused or unreadable file raises CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickler_detail(err)
        if "Unsupported global" not in detail:  # garbage bytes, not a refused class
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint, or a truncated or corrupt one ({detail}). "
                "Check the path; if it is the right file, download it again."
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: the file contains pickled objects other than tensors and "
            f"plain containers ({detail}). Loading it could execute code. If you trust its "
            "source, re-save only its state dict (torch.save(sd, ...)) or convert it to "
            "safetensors."
        ) from None
    except Exception as err:  # the unpickler raises anything on garbage (IndexError, KeyError..)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no details'}). The file may be "
            "truncated or corrupt: download it again."
        ) from None


def _unpickler_detail(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (e.g. "Unsupported global: GLOBAL foo.Bar"
    or "Unsupported operand 255"), without its advice to load with ``weights_only=False``."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if found:
        return found.group(1).strip().split(" was not an allowed global")[0]
    return text.strip().splitlines()[0] if text.strip() else "no details"


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}). The file may be truncated or "
            "corrupt: download or export it again."
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: invalid JSON ({err}); restore the file") from None


def _tensor_dict(obj: Any, path: Path, where: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: {where} is not a state dict of tensors")
    return dict(obj)


# ------------------------------------------------------------------------------ key layouts
def _strip_norm_counters(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------- format detection
def _looks_official(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("backbone.0.body.", "detr.backbone.0.body.")) for k in state)


def _looks_huggingface(state: Mapping[str, Tensor]) -> bool:
    prefixes = ("model.backbone.", "model.encoder.", "detr.model.backbone.", "detr.model.encoder.")
    return any(k.startswith(prefixes) for k in state)


def _looks_ours(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("backbone.body.") for k in state)


def _unknown_layout(path: Path, state: Mapping[str, Tensor]) -> CheckpointError:
    sample = ", ".join(list(state)[:5]) or "no keys"
    return CheckpointError(
        f"{path}: unknown checkpoint layout (first keys: {sample}). Expected an official DETR "
        "checkpoint (backbone.0.body.*), a Hugging Face DetrForObjectDetection or "
        "DetrForSegmentation checkpoint (model.backbone.conv_encoder.*), or a detr-lightning "
        "checkpoint/export."
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read any supported checkpoint into our layout without building a model.

    Returns a dict with ``state_dict`` (our key names), ``model`` (the ``model`` spec: the
    settings of :func:`~detr_lightning.models.build_detr`, the backbone's nested under
    ``backbone``), ``label_map`` (``category_ids``/``names``) or None, ``format`` and
    ``hparams`` (the full module settings for our own checkpoints), and ``mask_head``: a
    panoptic checkpoint's (official or Hugging Face ``DetrForSegmentation``) mask-head
    tensors under the names of :class:`~detr_lightning.models.segmentation.DETRSegmentation`
    (``bbox_attention.*``, ``mask_head.*``), else None; ``state_dict`` is then the detector
    inside it. Settings written by the package's first layout come in today's
    (:mod:`.legacy`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{path} is a directory without {CONFIG_FILE}; pass a Hugging Face model "
                "directory, a detr-lightning export directory, or a checkpoint file"
            )
        weights = next(
            (path / n for n in (WEIGHTS_FILE, "pytorch_model.bin") if (path / n).is_file()), None
        )
        if weights is None:
            raise FileNotFoundError(
                f"{path}: found {CONFIG_FILE} but neither {WEIGHTS_FILE} nor pytorch_model.bin"
            )
        return _read_with_config(weights, config_path)
    if needs_config_file(path):
        config_path = path.with_name(CONFIG_FILE)
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{path}: weights need the {CONFIG_FILE} that was saved beside them"
            )
        return _read_with_config(path, config_path)
    return _read_torch_file(path)


def _read_with_config(weights: Path, config_path: Path) -> dict[str, Any]:
    config = _read_json(config_path)
    state = (
        _safetensors_load(weights)
        if weights.suffix == ".safetensors"
        else _tensor_dict(load_torch_file(weights), weights, "the file")
    )
    state = _strip_norm_counters(state)
    if config.get("format") == EXPORT_FORMAT:
        hparams = upgrade_module_hparams(config.get("hparams") or {})
        if "model" not in hparams:
            raise CheckpointError(f"{config_path}: detr-lightning config without hparams.model")
        return {
            "state_dict": state,
            "model": hparams["model"],
            "label_map": hparams.get("label_map"),
            "format": "export",
            "hparams": hparams,
            "path": weights,
        }
    if config.get("model_type") != "detr" and not _looks_huggingface(state):
        raise _unknown_layout(weights, state)
    detector, head = split_panoptic(state)
    converted = from_huggingface(detector, weights)
    model = infer_model_config(converted, weights)
    hf_settings = hf_model_config(config, config_path)
    model["backbone"]["dilation"] = hf_settings.pop("backbone_dilation")
    model.update(hf_settings)
    id2label = config.get("id2label") or {}
    names = [
        str(id2label.get(str(i), id2label.get(i, f"class_{i}")))
        for i in range(model["num_classes"])
    ]
    # labels are category ids; "N/A" entries (COCO's unused ids) stand for no category
    label_map = LabelMap.from_names(names).to_dict()
    return {
        "state_dict": converted,
        "model": model,
        "label_map": label_map,
        "format": "huggingface",
        "hparams": None,
        "path": weights,
        "mask_head": _mask_head(head, weights),
    }


def needs_config_file(path: Path) -> bool:
    """Whether :func:`read_checkpoint` reads the weights file ``path`` with the config.json
    beside it (safetensors, Hugging Face's pytorch_model.bin), not as one torch file."""
    return path.suffix == ".safetensors" or path.name == "pytorch_model.bin"


def read_loaded_checkpoint(obj: Any, path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_checkpoint` of a torch file already loaded (:func:`load_torch_file`) from
    ``path``, which is named in errors."""
    return _read_torch_file(Path(path), obj)


def _read_torch_file(path: Path, obj: Any = None) -> dict[str, Any]:
    if obj is None:
        obj = load_torch_file(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and "hyper_parameters" in obj:
        hparams = obj["hyper_parameters"]
        if not isinstance(hparams, Mapping) or "model" not in hparams:
            raise CheckpointError(f"{path}: Lightning checkpoint without DETRModule settings")
        hparams = upgrade_module_hparams(hparams)
        state = _tensor_dict(obj["state_dict"], path, "'state_dict'")
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        return {
            "state_dict": state,
            "model": hparams["model"],
            "label_map": hparams.get("label_map"),
            "format": "lightning",
            "hparams": hparams,
            "path": path,
        }
    args = None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        args = obj.get("args")
        obj = obj["model"]
    state = _strip_norm_counters(_tensor_dict(obj, path, "the checkpoint"))
    head: dict[str, Tensor] = {}
    if _looks_official(state):
        converted, head = from_official(state)
        model = infer_model_config(converted, path)
        dilation = bool(getattr(args, "dilation", False)) or "dc5" in path.name.lower()
        model["backbone"]["dilation"] = dilation
        if args is not None and hasattr(args, "nheads"):
            model["nheads"] = int(args.nheads)
        fmt = "official"
    elif _looks_huggingface(state):
        detector, head = split_panoptic(state)
        converted = from_huggingface(detector, path)
        model = infer_model_config(converted, path)
        fmt = "huggingface"
    elif _looks_ours(state):
        converted = state
        model = infer_model_config(converted, path)
        fmt = "state_dict"
    else:
        raise _unknown_layout(path, state)
    label_map = None
    if model["num_classes"] == len(COCO_CATEGORY_NAMES):
        label_map = LabelMap.from_names(COCO_CATEGORY_NAMES).to_dict()
    return {
        "state_dict": converted,
        "model": model,
        "label_map": label_map,
        "format": fmt,
        "hparams": None,
        "path": path,
        "mask_head": _mask_head(head, path),
    }


def _mask_head(head: dict[str, Tensor], path: Path) -> dict[str, Tensor] | None:
    """A panoptic checkpoint's mask head (official names), or None for a detector."""
    if not head:
        return None
    log.info("%s: a panoptic checkpoint; its mask head has %d tensors", path, len(head))
    return head
