"""detr-export (export.py): checkpoints to ONNX and TorchScript, and its setup errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from detr_lightning import DETRModule, export
from detr_lightning.cli.export import export_cli
from detr_lightning.deploy.exporters import sidecar_path
from detr_lightning.ops.padding import pad_images
from detr_lightning.utils.errors import SetupError
from helpers.models import TINY_MODEL, randomize_frozen_batchnorm
from helpers.pipeline import compose_config

# torch >= 2.9 marks torch.jit deprecated; loading the exported file is what deployments do.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")


LABEL_MAP = {"category_ids": [1, 2, 4, 7, 9], "names": ["a", "b", "c", "d", "e"]}
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
