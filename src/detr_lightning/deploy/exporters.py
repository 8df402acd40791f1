"""Deployment exports of DETR: an ONNX or TorchScript graph plus a JSON sidecar.

Both graphs take ``images`` float32 [B, 3, H, W] (normalized with the ImageNet mean/std,
zero-padded bottom/right to a common size) and ``padding_mask`` bool [B, H, W] (True on
padding), with batch, height and width dynamic, and return ``pred_logits`` [B, Q, C + 1]
(unnormalized; the last class is "no object") and ``pred_boxes`` [B, Q, 4] (cxcywh in [0, 1]
of each unpadded image). Decoder auxiliary outputs are left out.

The sidecar ``<file>.json`` says how to prepare images (resize, normalization, padding), how to
name the classes (the label map) and what the inputs and outputs are called and shaped.
``detr-export`` (:mod:`detr_lightning.cli.export`, conf/export.yaml) is the command.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.presets import IMAGENET_MEAN, IMAGENET_STD
from ..utils.io import atomic_write
from .graph import DYNAMIC_AXES, INPUT_NAMES, OUTPUT_NAMES, DeployableDETR, detr_of, example_inputs

__all__ = ["deployment_info", "export_onnx", "export_torchscript", "sidecar_path", "write_sidecar"]

log = logging.getLogger(__name__)


FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


MIN_OPSET = 17


DEFAULT_VAL_SIZE, DEFAULT_MAX_SIZE = 800, 1333


ONNX_INSTALL_HINT = "pip install 'detr-lightning[onnx]'"


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

    graph = DeployableDETR(detr_of(module))
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
    graph = DeployableDETR(detr_of(module))
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
    model = detr_of(module)
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
            # rounding the new sides instead of truncating them moves boxes by up to ~1.5 px
            "resize_rounding": "floor: each new side is truncated to whole pixels, not rounded",
            "resized_size": "short <= long the original sides; if max_size <= val_size: "
            "long' = max_size, short' = floor(max_size * short / long); else short' = val_size, "
            "long' = floor(val_size * long / short), and if long' > max_size: "
            "short' = floor(max_size * val_size / long'), long' = max_size",
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
