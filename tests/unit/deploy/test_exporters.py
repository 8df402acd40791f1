"""Deployment exports: the module is left as it was, the sidecar describes the graph, bad
settings are refused."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from detr_lightning import DETRModule
from detr_lightning.data.presets import make_val_transforms
from detr_lightning.data.transforms import resized_size
from detr_lightning.deploy.exporters import export_onnx, export_torchscript, sidecar_path
from detr_lightning.models.backbone import Backbone
from helpers.models import DEPLOY_LABEL_MAP as LABEL_MAP
from helpers.models import NUM_CLASSES, NUM_QUERIES, deploy_module

# torch >= 2.9 marks torch.jit deprecated; loading the exported file is what deployments do.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")


# Traced at a size that none of the cases below uses.
EXAMPLE_SIZE = (112, 144)


@pytest.fixture(scope="module")
def module() -> DETRModule:
    return deploy_module()


@pytest.fixture(scope="module")
def onnx_file(module: DETRModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx")
    return export_onnx(module, tmp_path_factory.mktemp("onnx") / "model.onnx",
                       example_size=EXAMPLE_SIZE)  # fmt: skip


@pytest.fixture(scope="module")
def torchscript_file(module: DETRModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchscript") / "model.pt"
    return export_torchscript(module, path, example_size=EXAMPLE_SIZE)


def test_export_leaves_the_module_unchanged(module: DETRModule, torchscript_file: Path) -> None:
    assert module.model.aux_loss and isinstance(module.model.backbone, Backbone)
    assert not module.training


def test_sidecars_describe_inputs_outputs_preprocessing_and_labels(
    module: DETRModule, onnx_file: Path, torchscript_file: Path
) -> None:
    for path, fmt in ((onnx_file, "onnx"), (torchscript_file, "torchscript")):
        assert sidecar_path(path) == path.with_name(path.name + ".json")
        info = json.loads(sidecar_path(path).read_text())
        assert info["file"] == path.name and info["format"] == fmt
        assert info["opset"] == (17 if fmt == "onnx" else None)
        assert info["label_map"] == module.label_map == LABEL_MAP
        assert (info["num_classes"], info["num_queries"]) == (NUM_CLASSES, NUM_QUERIES)
        prep = info["preprocessing"]
        assert (prep["val_size"], prep["max_size"]) == (96, 160)  # the module's data settings
        assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]
        assert [(i["name"], i["dtype"], i["shape"]) for i in info["inputs"]] == [
            ("images", "float32", ["batch", 3, "height", "width"]),
            ("padding_mask", "bool", ["batch", "height", "width"]),
        ]
        assert [(o["name"], o["shape"]) for o in info["outputs"]] == [
            ("pred_logits", ["batch", NUM_QUERIES, NUM_CLASSES + 1]),
            ("pred_boxes", ["batch", NUM_QUERIES, 4]),
        ]


@pytest.mark.parametrize(("val_size", "max_size"), [(96, 160), (800, 1333), (160, 160)])
def test_the_sidecar_resize_rule_is_the_evaluation_transform(val_size, max_size) -> None:
    """The sizes that ``resized_size`` (the sidecar's ``resized_size`` rule) gives are the
    sizes evaluation resizes to: truncated, which rounding would miss on most of these."""
    transform = make_val_transforms(val_size=val_size, max_size=max_size)
    for height, width in [(100, 133), (133, 100), (99, 301), (480, 640), (427, 640), (97, 97)]:
        image, _ = transform(tv_tensors.Image(torch.zeros(3, height, width)), {})
        assert tuple(image.shape[-2:]) == resized_size(height, width, val_size, max_size)
    assert resized_size(427, 640, 800, 1333) == (800, 1199)  # 1199.06: floor
    assert resized_size(100, 133, 96, 160) == (96, 127)  # 127.68: floor, not 128


def test_the_trace_warns_about_none_of_the_package_s_code(module: DETRModule, tmp_path) -> None:
    """No TracerWarning points into detr_lightning (an export printed one for the layout check
    of ``DETR.channels_last``); torch's own, inside its tensor methods, are not ours to fix."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_torchscript(module, tmp_path / "model.pt", example_size=EXAMPLE_SIZE)
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, torch.jit.TracerWarning) and "detr_lightning" in w.filename
    ]
    assert ours == []
    info = json.loads(sidecar_path(tmp_path / "model.pt").read_text())
    assert info["preprocessing"]["resize_rounding"].startswith("floor")


def test_export_functions_reject_bad_settings(module: DETRModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset 16 is too old"):
        export_onnx(module, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ValueError, match="example_size must be"):
        export_torchscript(module, tmp_path / "m.pt", example_size=(32, 32))
    with pytest.raises(TypeError, match="expected a DETRModule"):
        export_torchscript(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())
