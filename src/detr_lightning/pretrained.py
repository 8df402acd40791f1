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

from .data.coco_names import COCO_CATEGORY_NAMES
from .data.labels import LabelMap
from .io import atomic_write, to_plain

log = logging.getLogger(__name__)

EXPORT_FORMAT = "detr-lightning"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CLASS_HEAD_KEYS = ("class_embed.weight", "class_embed.bias")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


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


def _count_indexed(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of distinct N in keys ``{prefix}N.``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _infer_backbone(state: Mapping[str, Tensor], path: Path) -> str:
    blocks = _count_indexed(state, "backbone.body.layer3.")
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state
    names = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18"}
    names[(False, 6)] = "resnet34"
    if (bottleneck, blocks) not in names:
        raise CheckpointError(
            f"{path}: cannot tell the ResNet depth from the weights (layer3 has {blocks} blocks, "
            f"bottleneck={bottleneck}); supported: resnet18/34/50/101"
        )
    return names[(bottleneck, blocks)]


def _infer_model_config(state: Mapping[str, Tensor], path: Path) -> dict[str, Any]:
    """Architecture keyword arguments of :func:`build_detr` read off our state dict."""
    for key in ("query_embed.weight", "class_embed.weight", "transformer.decoder.norm.weight"):
        if key not in state:
            raise CheckpointError(f"{path}: no {key!r}; this is not a DETR detection checkpoint")
    settings = {"num_stages": 3} if "backbone.body.layer4.0.conv1.weight" not in state else {}
    return settings | {
        "backbone": _infer_backbone(state, path),
        "num_classes": state["class_embed.weight"].shape[0] - 1,
        "num_queries": state["query_embed.weight"].shape[0],
        "hidden_dim": state["query_embed.weight"].shape[1],
        "enc_layers": _count_indexed(state, "transformer.encoder.layers."),
        "dec_layers": _count_indexed(state, "transformer.decoder.layers."),
        "dim_feedforward": state["transformer.decoder.layers.0.linear1.weight"].shape[0],
        "pre_norm": "transformer.encoder.norm.weight" in state,
        "position_embedding": "learned"
        if "position_encoding.row_embed.weight" in state
        else "sine",
    }


def _from_official(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Official key names -> ours. Returns the converted dict and the keys left out."""
    converted, skipped = {}, []
    for key, value in state.items():
        if key.startswith("detr."):  # panoptic checkpoints wrap the detector
            key = key[len("detr.") :]
        elif key.startswith(("bbox_attention.", "mask_head.")):
            skipped.append(key)
            continue
        if key.startswith("backbone.0."):
            key = key[len("backbone.0.") :]
            key = "backbone." + key
        elif key.startswith("backbone.1."):
            key = "position_encoding." + key[len("backbone.1.") :]
        converted[key] = value
    return converted, skipped


_HF_ENCODER = {"self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"}
_HF_DECODER = {
    "self_attn_layer_norm": "norm1",
    "encoder_attn_layer_norm": "norm2",
    "final_layer_norm": "norm3",
    "encoder_attn": "multihead_attn",
}


def _from_huggingface(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Hugging Face DETR key names (as written by ``save_pretrained``) -> ours.

    q/k/v projections are packed into ``in_proj_weight``/``in_proj_bias`` (q rows, then k, v).
    In-memory names of transformers 5 (``o_proj``, ``mlp.fc1``, ``model.backbone.model``) are
    accepted too, for state dicts saved with ``torch.save(model.state_dict())``.
    """
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        renamed[key] = value

    converted: dict[str, Tensor] = {}
    packs: dict[str, dict[str, Tensor]] = {}
    for key, value in renamed.items():
        if key.startswith("model.backbone.conv_encoder.model."):
            converted["backbone.body." + key[len("model.backbone.conv_encoder.model.") :]] = value
            continue
        if key.startswith("model.backbone.position_embedding."):
            sub = key[len("model.backbone.position_embedding.") :]
            sub = sub.replace("row_embeddings", "row_embed").replace(
                "column_embeddings", "col_embed"
            )
            converted["position_encoding." + sub] = value
            continue
        simple = {
            "model.input_projection.": "input_proj.",
            "model.query_position_embeddings.": "query_embed.",
            "class_labels_classifier.": "class_embed.",
            "bbox_predictor.": "bbox_embed.",
            "model.decoder.layernorm.": "transformer.decoder.norm.",
        }
        prefix = next((p for p in simple if key.startswith(p)), None)
        if prefix is not None:
            converted[simple[prefix] + key[len(prefix) :]] = value
            continue
        match = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$", key)
        if match is None:
            raise CheckpointError(
                f"{path}: unexpected key {key!r} for a Hugging Face DETR checkpoint; only "
                "DetrForObjectDetection weights are supported"
            )
        part, index, rest = match.groups()
        base = f"transformer.{part}.layers.{index}."
        names = _HF_ENCODER if part == "encoder" else _HF_DECODER
        attn = re.match(r"(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)$", rest)
        if attn is not None:
            module, which, kind = attn.groups()
            packs.setdefault(base + names.get(module, module) + "." + kind, {})[which] = value
            continue
        head, _, tail = rest.partition(".")
        if head in ("fc1", "fc2"):
            head = "linear" + head[-1]
        converted[base + names.get(head, head) + "." + tail] = value
    for key, parts in packs.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{path}: attention {key} lacks some of q/k/v projections")
        module, kind = key.rsplit(".", 1)
        converted[f"{module}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def _hf_model_config(config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Settings from a Hugging Face DetrConfig that the weights do not reveal."""
    backbone_config = config.get("backbone_config") or {}
    dilation = bool(config.get("dilation", False)) or backbone_config.get("output_stride") == 16
    settings: dict[str, Any] = {
        "dilation": dilation,
        "nheads": int(config.get("encoder_attention_heads", 8)),
        "dropout": float(config.get("dropout", 0.1)),
        "aux_loss": True,
    }
    if config.get("encoder_attention_heads") != config.get("decoder_attention_heads"):
        raise CheckpointError(
            f"{path}: encoder and decoder attention head counts differ; DETR uses one count"
        )
    return settings


# ------------------------------------------------------------------------- format detection
def _looks_official(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("backbone.0.body.", "detr.backbone.0.body.")) for k in state)


def _looks_huggingface(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("model.backbone.", "model.encoder.")) for k in state)


def _looks_ours(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("backbone.body.") for k in state)


def _unknown_layout(path: Path, state: Mapping[str, Tensor]) -> CheckpointError:
    sample = ", ".join(list(state)[:5]) or "no keys"
    return CheckpointError(
        f"{path}: unknown checkpoint layout (first keys: {sample}). Expected an official DETR "
        "checkpoint (backbone.0.body.*), a Hugging Face DetrForObjectDetection checkpoint "
        "(model.backbone.conv_encoder.*), or a detr-lightning checkpoint/export."
    )


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read any supported checkpoint into our layout without building a model.

    Returns a dict with ``state_dict`` (our key names), ``model`` (:func:`build_detr` keyword
    arguments), ``label_map`` (``category_ids``/``names``) or None, ``format`` and ``hparams``
    (the full module settings for our own checkpoints).
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
        hparams = config.get("hparams") or {}
        if "model" not in hparams:
            raise CheckpointError(f"{config_path}: detr-lightning config without hparams.model")
        return {
            "state_dict": state,
            "model": dict(hparams["model"]),
            "label_map": hparams.get("label_map"),
            "format": "export",
            "hparams": hparams,
            "path": weights,
        }
    if config.get("model_type") != "detr" and not _looks_huggingface(state):
        raise _unknown_layout(weights, state)
    converted = _from_huggingface(state, weights)
    model = _infer_model_config(converted, weights) | _hf_model_config(config, config_path)
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
        state = _tensor_dict(obj["state_dict"], path, "'state_dict'")
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        return {
            "state_dict": state,
            "model": dict(hparams["model"]),
            "label_map": hparams.get("label_map"),
            "format": "lightning",
            "hparams": dict(hparams),
            "path": path,
        }
    args = None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        args = obj.get("args")
        obj = obj["model"]
    state = _strip_norm_counters(_tensor_dict(obj, path, "the checkpoint"))
    if _looks_official(state):
        converted, skipped = _from_official(state)
        if skipped:
            log.info("%s: left out %d panoptic mask-head tensors", path, len(skipped))
        model = _infer_model_config(converted, path)
        model["dilation"] = bool(getattr(args, "dilation", False)) or "dc5" in path.name.lower()
        if args is not None and hasattr(args, "nheads"):
            model["nheads"] = int(args.nheads)
        fmt = "official"
    elif _looks_huggingface(state):
        converted = _from_huggingface(state, path)
        model = _infer_model_config(converted, path)
        fmt = "huggingface"
    elif _looks_ours(state):
        converted = state
        model = _infer_model_config(converted, path)
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
    }


# ---------------------------------------------------------------------------------- loading
def load_state_into(
    model: torch.nn.Module,
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    reinit_class_head: bool = False,
) -> None:
    """Copy ``state`` into ``model`` (our key names), or raise one error listing every problem.

    With ``reinit_class_head`` the classifier keeps its fresh initialization.
    """
    own = model.state_dict()
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
        lines.append(
            "  Check the backbone/dilation/layer settings; only the class head may differ "
            "(pass num_classes to re-initialize it)."
        )
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for key, value in own.items():
            if key not in skip:
                value.copy_(state[key])


def load_pretrained(
    path: str | os.PathLike,
    dilation: bool | None = None,
    num_classes: int | None = None,
):
    """Build a :class:`~detr_lightning.DETRModule` from a checkpoint, in eval mode.

    Args:
        path: official ``.pth``, Hugging Face directory/file, our ``.ckpt`` or export directory.
        dilation: force DC5 on/off (default: from the checkpoint's config or file name).
        num_classes: when different from the checkpoint's, the class head is re-initialized for
            fine-tuning (logged); the rest must match exactly.
    """
    from .module import DETRModule

    info = read_checkpoint(path)
    model_cfg = dict(info["model"])
    if dilation is not None:
        model_cfg["dilation"] = bool(dilation)
    label_map = info["label_map"]
    reinit = num_classes is not None and num_classes != model_cfg["num_classes"]
    if reinit:
        log.info(
            "%s: re-initializing the class head for %d classes (checkpoint has %d); all other "
            "weights are loaded",
            info["path"],
            num_classes,
            model_cfg["num_classes"],
        )
        model_cfg["num_classes"] = num_classes
        label_map = None
    hparams = dict(info["hparams"] or {})
    hparams["model"] = model_cfg
    hparams["label_map"] = label_map
    module = DETRModule(**hparams)
    load_state_into(module.model, info["state_dict"], info["path"], reinit_class_head=reinit)
    return module.eval()


# ---------------------------------------------------------------------------------- export
def export(module, path: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into directory ``path`` (atomically).

    The directory loads back with :func:`load_pretrained`; the config holds every module
    setting (model, loss, post-processing, label map).
    """
    from safetensors.torch import save_file

    directory = Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.model.state_dict().items()}
    config = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "hparams": to_plain(dict(module.hparams)),
    }
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    atomic_write(
        directory / CONFIG_FILE,
        lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)),
    )
    return directory
