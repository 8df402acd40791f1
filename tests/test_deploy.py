"""Deployment exports: one ONNX and one TorchScript file per format, run at other batch and
image sizes than traced and compared with PyTorch; the sidecar JSON; export.py's export_cli."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from detr_lightning import DETRModule, export
from detr_lightning.cli.export import export_cli
from detr_lightning.deploy.exporters import export_onnx, export_torchscript, sidecar_path
from detr_lightning.deploy.graph import nearest_resize_mask
from detr_lightning.models.backbone import Backbone, resize_mask
from detr_lightning.ops.padding import pad_images
from detr_lightning.utils.errors import SetupError
from model_fixtures import NUM_CLASSES, NUM_QUERIES, TINY_MODEL, randomize_frozen_batchnorm
from pipeline_fixtures import compose_config

# torch >= 2.9 marks torch.jit deprecated; loading the exported file is what deployments do.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")

LABEL_MAP = {"category_ids": [1, 2, 4, 7, 9], "names": ["a", "b", "c", "d", "e"]}
# Traced at a size that none of the cases below uses.
EXAMPLE_SIZE = (112, 144)
CLI_EXAMPLE_SIZE = "example_size=[112,144]"
BOX_ATOL, LOGIT_ATOL = 1e-4, 1e-3

# Image sizes per batch, padded bottom/right to the first (largest) one: batch 1, 2 and 4 at
# 96x128 and 160x112. In "b2-160x112" the 56-wide image in a 112-wide batch is a size where
# an ONNX Resize of the mask would move the padding boundary (see ExactMaskBackbone), and so
# is "b2-120x128" (60 of 120 rows).
CASES = {
    "b1-96x128": [(96, 128)],
    "b1-160x112": [(160, 112)],
    "b2-96x128": [(96, 128), (64, 100)],
    "b2-160x112": [(160, 112), (120, 56)],
    "b2-120x128": [(120, 128), (60, 96)],
    "b4-96x128": [(96, 128), (64, 100), (80, 128), (96, 72)],
    "b4-160x112": [(160, 112), (120, 56), (100, 112), (160, 80)],
}


def _batch(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return pad_images([torch.randn(3, h, w, generator=generator) for h, w in sizes])


def _reference(module: DETRModule, images, padding_mask) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = module(images, padding_mask)
    return out["pred_logits"], out["pred_boxes"]


def _assert_parity(logits, boxes, ref_logits, ref_boxes) -> None:
    assert logits.shape == ref_logits.shape and boxes.shape == ref_boxes.shape
    torch.testing.assert_close(boxes, ref_boxes, atol=BOX_ATOL, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)


@pytest.fixture(scope="module")
def module() -> DETRModule:
    torch.manual_seed(0)
    detr = DETRModule(
        model=TINY_MODEL, label_map=LABEL_MAP, data={"val_size": 96, "max_size": 160}
    ).eval()
    with torch.no_grad():
        randomize_frozen_batchnorm(detr.model, torch.Generator().manual_seed(0))
    return detr


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


# --- the exported graphs against PyTorch -----------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_matches_pytorch(case: str, module: DETRModule, onnx_session) -> None:
    images, padding_mask = _batch(CASES[case])
    logits, boxes = onnx_session.run(
        ["pred_logits", "pred_boxes"],
        {"images": images.numpy(), "padding_mask": padding_mask.numpy()},
    )
    _assert_parity(
        torch.from_numpy(logits), torch.from_numpy(boxes), *_reference(module, images, padding_mask)
    )


@pytest.mark.parametrize("case", list(CASES))
def test_torchscript_matches_pytorch(case: str, module: DETRModule, torchscript_module) -> None:
    images, padding_mask = _batch(CASES[case])
    with torch.no_grad():
        logits, boxes = torchscript_module(images, padding_mask)
    _assert_parity(logits, boxes, *_reference(module, images, padding_mask))


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


def test_export_leaves_the_module_unchanged(module: DETRModule, torchscript_file: Path) -> None:
    assert module.model.aux_loss and isinstance(module.model.backbone, Backbone)
    assert not module.training


# --- sidecar --------------------------------------------------------------------------------


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


# --- export.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(module: DETRModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(module, tmp_path_factory.mktemp("checkpoint") / "tiny")


def test_cli_exports_a_checkpoint_end_to_end(
    module: DETRModule, export_dir: Path, tmp_path: Path
) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    overrides = [f"pretrained={export_dir}", f"run_dir={tmp_path}", CLI_EXAMPLE_SIZE]
    cfg = compose_config("export", overrides)
    written = export_cli(cfg)
    assert written == {
        "output": str(tmp_path / "model.onnx"),
        "sidecar": str(tmp_path / "model.onnx.json"),
    }
    info = json.loads(Path(written["sidecar"]).read_text())
    assert info["label_map"] == LABEL_MAP and info["preprocessing"]["val_size"] == 96
    session = ort.InferenceSession(written["output"], providers=["CPUExecutionProvider"])
    images, padding_mask = _batch(CASES["b2-160x112"], seed=1)
    logits, boxes = session.run(
        None, {"images": images.numpy(), "padding_mask": padding_mask.numpy()}
    )
    _assert_parity(
        torch.from_numpy(logits), torch.from_numpy(boxes), *_reference(module, images, padding_mask)
    )


def test_cli_torchscript_to_a_chosen_output(export_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "deploy" / "detr.pt"
    cfg = compose_config(
        "export",
        [
            f"ckpt_path={export_dir}",
            "format=torchscript",
            f"output={output}",
            "run_dir=unused",
            CLI_EXAMPLE_SIZE,
        ],
    )
    assert export_cli(cfg)["output"] == str(output)
    assert torch.jit.load(str(output)) is not None
    assert json.loads(sidecar_path(output).read_text())["format"] == "torchscript"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "nothing to export: pass ckpt_path=PATH"),
        (["ckpt_path=does/not/exist.ckpt"], "checkpoint not found: does/not/exist.ckpt"),
        (["pretrained=x.pth", "format=tflite"], r"unknown format='tflite'; choose one of"),
        (["pretrained=x.pth", "opset=13"], "opset=13 is too old; use opset=17"),
        ([f"pretrained={Path(__file__).parent}", "format=onnx"], "without config.json"),
    ],
)
def test_cli_setup_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    cfg = compose_config("export", [*overrides, f"run_dir={tmp_path}"])
    with pytest.raises(SetupError, match=message):
        export_cli(cfg)
    assert not list(tmp_path.iterdir())


def test_cli_names_the_extra_when_onnx_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnx" else find_spec(name, *a),
    )
    cfg = compose_config("export", ["pretrained=x.pth", f"run_dir={tmp_path}"])
    with pytest.raises(SetupError, match=r"pip install 'detr-lightning\[onnx\]'"):
        export_cli(cfg)


def test_export_functions_reject_bad_settings(module: DETRModule, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="opset 16 is too old"):
        export_onnx(module, tmp_path / "m.onnx", opset=16)
    with pytest.raises(ValueError, match="example_size must be"):
        export_torchscript(module, tmp_path / "m.pt", example_size=(32, 32))
    with pytest.raises(TypeError, match="expected a DETRModule"):
        export_torchscript(torch.nn.Linear(2, 2), tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())
