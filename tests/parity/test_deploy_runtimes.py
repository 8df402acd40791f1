"""Exported graphs against PyTorch: ONNX through onnxruntime and TorchScript give the
model's outputs at every batch and image size, and the padding mask resizes as torch does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detr_lightning import DETRModule
from detr_lightning.deploy.exporters import export_onnx, export_torchscript
from detr_lightning.deploy.graph import nearest_resize_mask
from detr_lightning.models.backbone import resize_mask
from helpers.deploy import CASES, assert_parity, batch, reference
from helpers.models import NUM_CLASSES, deploy_module

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
def onnx_session(onnx_file: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def torchscript_file(module: DETRModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchscript") / "model.pt"
    return export_torchscript(module, path, example_size=EXAMPLE_SIZE)


@pytest.fixture(scope="module")
def torchscript_module(torchscript_file: Path) -> torch.jit.ScriptModule:
    return torch.jit.load(str(torchscript_file))


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_matches_pytorch(case: str, module: DETRModule, onnx_session) -> None:
    images, padding_mask = batch(CASES[case])
    logits, boxes = onnx_session.run(
        ["pred_logits", "pred_boxes"],
        {"images": images.numpy(), "padding_mask": padding_mask.numpy()},
    )
    assert_parity(
        torch.from_numpy(logits), torch.from_numpy(boxes), *reference(module, images, padding_mask)
    )


@pytest.mark.parametrize("case", list(CASES))
def test_torchscript_matches_pytorch(case: str, module: DETRModule, torchscript_module) -> None:
    images, padding_mask = batch(CASES[case])
    with torch.no_grad():
        logits, boxes = torchscript_module(images, padding_mask)
    assert_parity(logits, boxes, *reference(module, images, padding_mask))


def test_onnx_graph_has_dynamic_batch_and_size(onnx_file: Path, onnx_session) -> None:
    import onnx

    onnx.checker.check_model(str(onnx_file))
    inputs = {node.name: (node.shape, node.type) for node in onnx_session.get_inputs()}
    assert inputs == {
        "images": (["batch", 3, "height", "width"], "tensor(float)"),
        "padding_mask": (["batch", "height", "width"], "tensor(bool)"),
    }
    outputs = {node.name: node.shape for node in onnx_session.get_outputs()}
    assert list(outputs) == ["pred_logits", "pred_boxes"]  # no auxiliary outputs
    assert outputs["pred_logits"][0] == "batch" and outputs["pred_logits"][2] == NUM_CLASSES + 1
    assert outputs["pred_boxes"][0] == "batch" and outputs["pred_boxes"][2] == 4


def test_mask_resize_matches_torch_nearest() -> None:
    """The exported mask resize picks exactly the rows torch's nearest resize picks."""
    generator = torch.Generator().manual_seed(0)
    for size in range(1, 600):
        for stride in (16, 32):
            mask = torch.rand(1, size, 3, generator=generator) < 0.5
            target = (-(-size // stride), 2)
            assert torch.equal(nearest_resize_mask(mask, target), resize_mask(mask, target)), size
