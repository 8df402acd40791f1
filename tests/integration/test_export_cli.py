"""detr-export (export.py): checkpoints to ONNX and TorchScript, and its setup errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from detr_lightning import DETRModule, save_pretrained
from detr_lightning.cli.export import export_cli
from detr_lightning.deploy.exporters import sidecar_path
from detr_lightning.utils.errors import SetupError
from helpers.deploy import CASES, assert_parity, batch, reference
from helpers.models import DEPLOY_LABEL_MAP as LABEL_MAP
from helpers.models import deploy_module
from helpers.pipeline import compose_config

# torch >= 2.9 marks torch.jit deprecated; loading the exported file is what deployments do.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")


CLI_EXAMPLE_SIZE = "example_size=[112,144]"


@pytest.fixture(scope="module")
def module() -> DETRModule:
    return deploy_module()


@pytest.fixture(scope="module")
def export_dir(module: DETRModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(module, tmp_path_factory.mktemp("checkpoint") / "tiny")


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
    images, padding_mask = batch(CASES["b2-160x112"], seed=1)
    logits, boxes = session.run(
        None, {"images": images.numpy(), "padding_mask": padding_mask.numpy()}
    )
    assert_parity(
        torch.from_numpy(logits), torch.from_numpy(boxes), *reference(module, images, padding_mask)
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
