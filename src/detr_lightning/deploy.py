"""Deployment exports of DETR: an ONNX or TorchScript graph plus a JSON sidecar.

Both graphs take ``images`` float32 [B, 3, H, W] (normalized with the ImageNet mean/std,
zero-padded bottom/right to a common size) and ``padding_mask`` bool [B, H, W] (True on
padding), with batch, height and width dynamic, and return ``pred_logits`` [B, Q, C + 1]
(unnormalized; the last class is "no object") and ``pred_boxes`` [B, Q, 4] (cxcywh in [0, 1]
of each unpadded image). Decoder auxiliary outputs are left out.

The sidecar ``<file>.json`` says how to prepare images (resize, normalization, padding), how to
name the classes (the label map) and what the inputs and outputs are called and shaped.
``export_cli(cfg)`` is the entry point of ``export.py`` (see ``conf/export.yaml``).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from .data.presets import IMAGENET_MEAN, IMAGENET_STD
from .errors import SetupError
from .io import atomic_write
from .models.detr import DETR

log = logging.getLogger(__name__)

INPUT_NAMES = ("images", "padding_mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
MIN_OPSET = 17
DEFAULT_VAL_SIZE, DEFAULT_MAX_SIZE = 800, 1333
ONNX_INSTALL_HINT = "pip install 'detr-lightning[onnx]'"

# Symbolic sizes of the exported graphs, as the ONNX dynamic axes and the sidecar name them.
DYNAMIC_AXES = {
    "images": {0: "batch", 2: "height", 3: "width"},
    "padding_mask": {0: "batch", 1: "height", 2: "width"},
    "pred_logits": {0: "batch"},
    "pred_boxes": {0: "batch"},
}


# ------------------------------------------------------------------------- exported graph
def nearest_source_index(out_size: int | Tensor, in_size: int | Tensor, device) -> Tensor:
    """Indices [out_size] int64 of the input rows that torch's nearest resize reads.

    PyTorch's nearest kernel reads row ``floor(i * (in / out))``, ratio and product in
    float32, clamped to ``in - 1``. Sizes may be the 0-dim tensors that tracing hands out for
    ``tensor.shape``, so the arithmetic stays in the graph and follows the input size.
    """
    if isinstance(in_size, Tensor):  # traced: keep the size in the graph
        in_size_float = in_size.to(device=device, dtype=torch.float32)
    else:
        in_size_float = torch.tensor(float(in_size), device=device)
    scale = in_size_float / out_size
    index = torch.arange(out_size, dtype=torch.float32, device=device) * scale
    return index.floor().long().clamp(max=in_size - 1)


def nearest_resize_mask(padding_mask: Tensor, size: Sequence[int] | torch.Size) -> Tensor:
    """[B, H, W] bool -> [B, h, w] bool, equal to ``models.backbone.resize_mask``.

    Computed by gathering the rows and columns torch's nearest resize reads, which an exported
    graph reproduces exactly; see :class:`ExactMaskBackbone` for why.
    """
    device = padding_mask.device
    rows = nearest_source_index(size[0], padding_mask.shape[1], device)
    cols = nearest_source_index(size[1], padding_mask.shape[2], device)
    return padding_mask.index_select(1, rows).index_select(2, cols)


class ExactMaskBackbone(nn.Module):
    """The model's backbone, with the padding mask resized by explicit indices.

    ``resize_mask`` (``F.interpolate``, nearest) becomes an ONNX ``Resize`` node with both
    exporters, and onnxruntime's Resize picks a neighbouring source row for many sizes: with
    a batch padded to 120 rows, stride 32 (4 feature rows) and an image 60 rows high, torch
    marks feature row 2 as padding and onnxruntime does not. The padding boundary then moves
    by one feature cell, which changes the attention mask and the position encoding, so the
    outputs differ by far more than rounding. Gathering the rows torch reads is exact in every
    runtime. The backbone's own forward still runs unchanged for the features.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W], padding_mask [B, H, W] -> features [B, C, h, w], mask [B, h, w]."""
        features, _ = self.backbone(images, padding_mask)
        return features, nearest_resize_mask(padding_mask, features.shape[-2:])


class DeployableDETR(nn.Module):
    """DETR with the exported signature: (images, padding_mask) -> (pred_logits, pred_boxes).

    Holds a float32 CPU copy of the model in eval mode without auxiliary outputs and with the
    backbone on the padded batch (``batch_invariant`` off: its per-image loop would be traced
    for the example's sizes; one image per call gives the same results); the caller's model is
    left as it was. images [B, 3, H, W] float32, padding_mask [B, H, W] bool (True on
    padding) -> pred_logits [B, Q, C + 1], pred_boxes [B, Q, 4] cxcywh in [0, 1].
    """

    def __init__(self, model: DETR) -> None:
        super().__init__()
        model = copy.deepcopy(model).float().cpu().eval()
        model.aux_loss = False  # nothing to drop after tracing, no tracer warnings about it
        if model.batch_invariant:
            log.info("exporting the padded-batch backbone: batch_invariant is not exported")
            model.batch_invariant = False
        model.backbone = ExactMaskBackbone(model.backbone)
        self.model = model

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images, padding_mask)
        return out["pred_logits"], out["pred_boxes"]


def _detr_of(module: nn.Module) -> DETR:
    model = getattr(module, "model", module)
    if not isinstance(model, DETR):
        raise TypeError(
            f"expected a DETRModule (e.g. from load_pretrained) or a DETR, got "
            f"{type(module).__name__}"
        )
    return model


def example_inputs(example_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """A traced example: 2 random images [2, 3, H, W], the second 3/4 as large, and its mask.

    Two images of different sizes make the example batch carry real padding; the exported
    graph does not depend on the example's sizes.
    """
    if len(example_size) != 2 or min(int(s) for s in example_size) < 64:
        raise ValueError(
            f"example_size must be (height, width), each at least 64 pixels; got {example_size}"
        )
    height, width = (int(s) for s in example_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, height, width, generator=generator)
    padding_mask = torch.zeros(2, height, width, dtype=torch.bool)
    padding_mask[1, height * 3 // 4 :, :] = True
    padding_mask[1, :, width * 3 // 4 :] = True
    images[padding_mask[:, None].expand_as(images)] = 0.0
    return images, padding_mask


# ------------------------------------------------------------------------------- writers
def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    example_size: Sequence[int] = (800, 1066),
) -> Path:
    """Write ``module`` as an ONNX graph to ``path`` (atomically) and its sidecar ``path.json``.

    Inputs ``images`` [batch, 3, height, width] float32 and ``padding_mask`` [batch, height,
    width] bool; outputs ``pred_logits`` [batch, Q, C + 1] and ``pred_boxes`` [batch, Q, 4].
    ``module`` is a DETRModule or a DETR; it is not modified. Needs the ``onnx`` package.
    """
    if int(opset) < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old; use opset >= {MIN_OPSET}")
    if importlib.util.find_spec("onnx") is None:
        raise ModuleNotFoundError(f"ONNX export needs the onnx package: {ONNX_INSTALL_HINT}")
    import onnx

    graph = DeployableDETR(_detr_of(module))
    inputs = example_inputs(example_size)
    # The TorchScript-based exporter (dynamo=False), chosen over the torch.export-based one:
    # with dynamic_axes it gives a graph that is correct at every batch size and image size
    # (checked against PyTorch in tests/test_deploy.py), exports opset 17, needs only `onnx`,
    # and takes ~2 s where the dynamo exporter takes ~30 s on a tiny model. The dynamo
    # exporter (torch 2.14, onnxscript 0.7) builds opset 18 and converts down to 17 with an
    # invalid Split node (`num_outputs` is opset 18) that onnxruntime refuses to load.
    # torch >= 2.9 warns that this exporter is deprecated; the warning is silenced here.
    options: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5
        options["dynamo"] = False

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
            torch.onnx.export(
                graph,
                inputs,
                tmp,
                opset_version=int(opset),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=DYNAMIC_AXES,
                do_constant_folding=True,
                **options,
            )
        onnx.checker.check_model(tmp)

    target = atomic_write(Path(path).expanduser(), write)
    write_sidecar(module, target, "onnx", opset=int(opset))
    return target


def export_torchscript(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    example_size: Sequence[int] = (800, 1066),
) -> Path:
    """Write ``module`` as a traced TorchScript module to ``path`` (atomically) + ``path.json``.

    ``torch.jit.load(path)(images, padding_mask)`` returns ``(pred_logits, pred_boxes)`` with
    the shapes of :func:`export_onnx`, at any batch and image size (tracing records the
    shape arithmetic of the model, none of it depends on Python ints). Traced on the CPU: the
    file runs on the CPU.
    """
    graph = DeployableDETR(_detr_of(module))
    inputs = example_inputs(example_size)
    with warnings.catch_warnings(), torch.no_grad():
        # torch >= 2.9 marks torch.jit as deprecated; the format is what was asked for.
        warnings.filterwarnings("ignore", message=r".*`torch\.jit\.\w+` is deprecated")
        traced = torch.jit.trace(graph, inputs, check_trace=False)
        target = atomic_write(Path(path).expanduser(), lambda tmp: torch.jit.save(traced, tmp))
    write_sidecar(module, target, "torchscript")
    return target


# ------------------------------------------------------------------------------- sidecar
def sidecar_path(path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def deployment_info(module: nn.Module, fmt: str, opset: int | None = None) -> dict[str, Any]:
    """What a deployment needs besides the graph: preprocessing, label map, input/output specs.

    ``preprocessing`` gives the evaluation resize (short side ``val_size``, long side at most
    ``max_size``, from the checkpoint's data settings, else 800 / 1333), the normalization of
    RGB values in [0, 1] and the padding convention.
    """
    model = _detr_of(module)
    hparams = getattr(module, "hparams", {}) or {}
    data = hparams.get("data") or {}
    num_classes, num_queries = model.num_classes, model.num_queries
    return {
        "format": fmt,
        "opset": opset,
        "torch_version": torch.__version__,
        "inputs": [
            {"name": "images", "dtype": "float32", "shape": ["batch", 3, "height", "width"]},
            {"name": "padding_mask", "dtype": "bool", "shape": ["batch", "height", "width"]},
        ],
        "outputs": [
            {
                "name": "pred_logits",
                "dtype": "float32",
                "shape": ["batch", num_queries, num_classes + 1],
            },
            {"name": "pred_boxes", "dtype": "float32", "shape": ["batch", num_queries, 4]},
        ],
        "preprocessing": {
            "val_size": int(data.get("val_size") or DEFAULT_VAL_SIZE),
            "max_size": int(data.get("max_size") or DEFAULT_MAX_SIZE),
            "resize": "short side to val_size, long side at most max_size, aspect ratio kept",
            "color": "RGB, values scaled to [0, 1]",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "padding": "zeros at the bottom and right to the largest image of the batch; "
            "padding_mask is True on the padded pixels",
        },
        "postprocessing": {
            "pred_logits": "softmax over the last axis; the last class (index num_classes) is "
            "'no object'; score and label: max over the others",
            "pred_boxes": "cxcywh in [0, 1] of each unpadded image: multiply by its "
            "width/height (of the original image to undo the resize)",
            "settings": dict(hparams.get("postprocess") or {}),
        },
        "num_classes": num_classes,
        "num_queries": num_queries,
        "label_map": getattr(module, "label_map", None),
    }


def write_sidecar(module: nn.Module, path: Path, fmt: str, opset: int | None = None) -> Path:
    """Write :func:`deployment_info` beside the exported file as ``<file>.json``."""
    info = {"file": path.name, **deployment_info(module, fmt, opset)}
    text = json.dumps(info, indent=2)
    return atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------- CLI
def export_cli(cfg: DictConfig | Mapping[str, Any]) -> dict[str, str]:
    """Export ``cfg.ckpt_path`` (or ``cfg.pretrained``) as ``cfg.format`` (onnx or torchscript).

    Writes ``cfg.output`` (default ``<run_dir>/model.onnx`` or ``model.pt``) and its sidecar
    JSON; returns both paths. ``cfg.example_size`` (height, width) is the size of the traced
    example batch. Setup problems raise :class:`SetupError`.
    """
    source = cfg.get("ckpt_path") or cfg.get("pretrained")
    if not source:
        raise SetupError(
            "nothing to export: pass ckpt_path=PATH (a training checkpoint) or pretrained=PATH "
            "(official .pth, Hugging Face directory, or export directory)"
        )
    fmt = str(cfg.get("format") or "onnx").lower()
    if fmt not in FORMATS:
        raise SetupError(f"unknown format={cfg.get('format')!r}; choose one of {sorted(FORMATS)}")
    opset = int(cfg.get("opset") or MIN_OPSET)
    if fmt == "onnx":
        if opset < MIN_OPSET:
            raise SetupError(f"opset={opset} is too old; use opset={MIN_OPSET} or newer")
        if importlib.util.find_spec("onnx") is None:
            raise SetupError(f"format=onnx needs the onnx package: {ONNX_INSTALL_HINT}")
    output = Path(cfg.get("output") or Path(cfg.run_dir) / FORMATS[fmt]).expanduser()

    from .console import quiet_third_party
    from .pretrained import load_pretrained

    quiet_third_party()
    try:
        module = load_pretrained(source)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError is a ValueError
        raise SetupError(str(err)) from err
    example_size = tuple(cfg.get("example_size") or (800, 1066))
    try:
        if fmt == "onnx":
            path = export_onnx(module, output, opset=opset, example_size=example_size)
        else:
            path = export_torchscript(module, output, example_size=example_size)
    except ValueError as err:  # example_size
        raise SetupError(str(err)) from err
    log.info("wrote %s and %s", path, sidecar_path(path))
    return {"output": str(path), "sidecar": str(sidecar_path(path))}


__all__ = [
    "DeployableDETR",
    "deployment_info",
    "export_cli",
    "export_onnx",
    "export_torchscript",
    "nearest_resize_mask",
    "sidecar_path",
]
