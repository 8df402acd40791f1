"""detr-predict with slice.*: tiled detections written as Python computes them, and the
slice settings checked before the model loads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from detr_lightning import DETRModule, load_pretrained, save_pretrained
from detr_lightning.cli.predict import predict_cli
from detr_lightning.inference import SliceSettings, predict_sliced
from detr_lightning.utils.errors import SetupError
from helpers.data import noise, save_png
from helpers.models import varied_module
from helpers.pipeline import compose_config


@pytest.fixture(scope="module")
def module() -> DETRModule:
    return varied_module()


@pytest.fixture(scope="module")
def export_dir(module, tmp_path_factory) -> Path:
    return save_pretrained(module, tmp_path_factory.mktemp("export"))


def _cli_config(tmp_path: Path, *overrides: str):
    return compose_config("predict", [f"run_dir={tmp_path / 'run'}", "device=cpu", *overrides])


def test_cli_sliced_detections_are_those_of_predict_sliced(export_dir, tmp_path, capsys):
    """90 x 130 pixels in 64-pixel tiles sharing 16: rows 0, 26 and columns 0, 48, 66 (six
    tiles, each preprocessed to 48 x 48 like an image) and the whole image; an unreadable
    file is skipped as without slicing."""
    folder = tmp_path / "photos"
    folder.mkdir()
    save_png(noise(90, 130, seed=4), folder / "a.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    overrides = [f"pretrained={export_dir}", f"input={folder}", "threshold=0.0", "batch_size=4"]
    json_path = predict_cli(
        _cli_config(tmp_path, *overrides, "slice.size=64", "slice.overlap=0.25")
    )
    assert "detections of 1 image(s)" in capsys.readouterr().out
    (record,) = json.loads(json_path.read_text())
    assert (record["height"], record["width"]) == (90, 130)
    assert (json_path.parent / record["drawing"]).is_file()

    predictor = load_pretrained(export_dir).predictor()
    slicing = SliceSettings(size=64, overlap=0.25)
    (expected,) = predict_sliced(predictor, folder / "a.png", slicing, threshold=0.0)
    (whole,) = predictor.predict(folder / "a.png", threshold=0.0)
    detections = record["detections"]
    assert len(detections) == len(expected["scores"]) > len(whole["scores"])
    assert [d["name"] for d in detections] == expected["names"]
    assert [d["category_id"] for d in detections] == expected["category_ids"].tolist()
    scores = torch.tensor([d["score"] for d in detections])
    torch.testing.assert_close(scores, expected["scores"], atol=1e-5, rtol=0)
    x0, y0, x1, y1 = expected["boxes"].unbind(1)
    xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)
    torch.testing.assert_close(
        torch.tensor([d["bbox"] for d in detections]), xywh, atol=0.011, rtol=0
    )


def test_cli_slice_settings_reach_predict_files(tmp_path, monkeypatch):
    save_png(noise(20, 30), tmp_path / "a.png")
    received = []

    def predict_files(predictor, files, run_dir, **options):
        received.append(options["slicing"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "detections.json").write_text('[{"file_name": "a.png", "detections": []}]')
        return run_dir / "detections.json"

    monkeypatch.setattr("detr_lightning.cli.predict.predict_files", predict_files)
    loaded = SimpleNamespace(predictor=lambda: None)  # the prediction is stubbed: no model
    monkeypatch.setattr("detr_lightning.cli.predict.load_pretrained", lambda path: loaded)
    base = [f"pretrained={tmp_path}", f"input={tmp_path / 'a.png'}"]
    predict_cli(_cli_config(tmp_path, *base))
    predict_cli(_cli_config(tmp_path, *base, "slice=null"))
    predict_cli(_cli_config(tmp_path, *base, "slice.size=[64,96]", "slice.merge=wbf",
                            "slice.whole_image=false", "slice.iou_threshold=0.6"))  # fmt: skip
    assert received == [
        None,
        None,
        SliceSettings(size=(64, 96), merge="wbf", whole_image=False, iou_threshold=0.6),
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["slice.size=16"], r"^slice\.size=16: give the tile side in pixels, at least 32"),
        (["slice.size=640", "slice.overlap=1.0"], r"^slice\.overlap=1\.0: .* \[0, 1\)"),
        (["slice.size=640", "slice.overlap=-0.2"], r"^slice\.overlap=-0\.2: "),
        (["slice.size=640", "slice.merge=mean"], r"^slice\.merge='mean': choose one of nms, wbf"),
        (["slice.size=640", "slice.iou_threshold=2"], r"^slice\.iou_threshold=2: "),
        (["slice.overlap=0.5"], r"^slice\.overlap=0\.5 has no effect while slice\.size is null"),
    ],
)
def test_cli_bad_slice_settings_are_one_line_errors(tmp_path, overrides, message):
    """Checked before the model loads (pretrained= is a folder without weights here)."""
    save_png(noise(20, 30), tmp_path / "a.png")
    cfg = _cli_config(tmp_path, f"pretrained={tmp_path}", f"input={tmp_path}", *overrides)
    with pytest.raises(SetupError, match=message) as raised:
        predict_cli(cfg)
    assert "\n" not in str(raised.value)
