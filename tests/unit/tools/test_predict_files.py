"""Predictions for files, folders and patterns: static shapes, unreadable files, inputs
that match nothing, drawing names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from detr_lightning import DETRModule
from detr_lightning.data.images import inference_transform, read_image
from detr_lightning.tools.predict_files import _drawing_names, image_files, predict_files
from detr_lightning.utils.errors import SetupError
from helpers.data import noise, save_png
from helpers.models import VARIED_DATA as DATA
from helpers.models import varied_module


@pytest.fixture(scope="module")
def module() -> DETRModule:
    return varied_module()


def test_static_shapes_for_the_sizes_many_files_share(module, tmp_path, caplog, monkeypatch):
    """``static_shapes`` N declares the input shapes that at least N files share (EXIF
    orientation counted) for the run, and puts the module's own declaration back after it;
    the detections are those of the general graph."""
    import detr_lightning.inference.graphs as graphs_module

    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        save_png(noise(60, 80, seed=len(name) + ord(name[0])), folder / name)
    rotated = Image.fromarray(noise(60, 80, seed=9).permute(2, 1, 0).numpy())  # 60 wide, 80 high
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated: 80 wide, 60 high, as the two above
    rotated.save(folder / "c.jpg", exif=exif.tobytes(), quality=95)
    save_png(noise(70, 70, seed=4), folder / "d.png")
    compiled = []
    original = graphs_module._static_trunk
    monkeypatch.setattr(
        graphs_module, "_static_trunk",
        lambda backbone, shape: compiled.append(shape) or original(backbone, shape),
    )  # fmt: skip
    backbone = module.model.backbone
    with caplog.at_level(logging.INFO, logger="detr_lightning.tools.predict_files"):
        fast = predict_files(
            module.predictor(), folder, tmp_path / "fast", static_shapes=3, draw=False
        )
    height, width = inference_transform(DATA)(read_image(folder / "a.png")).shape[-2:]
    assert compiled == [(1, 3, height, width)]
    assert f"({height}x{width}); 3 of 4 images" in caplog.text
    assert (
        graphs_module.static_shapes(backbone) == frozenset()
    )  # the module's own declaration, restored
    general = predict_files(module.predictor(), folder, tmp_path / "general", draw=False)
    assert compiled == [(1, 3, height, width)]  # nothing declared without static_shapes
    for a, b in zip(json.loads(fast.read_text()), json.loads(general.read_text()), strict=True):
        assert a["file_name"] == b["file_name"]
        # in one order whatever rounding does to near-equal scores
        ordered = lambda ds: sorted(ds, key=lambda d: (d["category_id"], *d["bbox"]))
        for x, y in zip(ordered(a["detections"]), ordered(b["detections"]), strict=True):
            assert x["category_id"] == y["category_id"]
            assert x["score"] == pytest.approx(y["score"], abs=1e-4)
            assert x["bbox"] == pytest.approx(y["bbox"], abs=0.02)
    with caplog.at_level(logging.INFO, logger="detr_lightning.tools.predict_files"):
        predict_files(module.predictor(), folder, tmp_path / "none", static_shapes=4, draw=False)
    assert "no input size is shared by 4 images" in caplog.text
    assert compiled == [(1, 3, height, width)]


def test_unreadable_files(module, tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    save_png(noise(50, 70, seed=3), folder / "a.png")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    save_png(noise(60, 40, seed=4), folder / "c.png")
    (folder / "notes.txt").write_text("not an image suffix: never read")
    with caplog.at_level(logging.WARNING, logger="detr_lightning.tools.predict_files"):
        json_path = predict_files(
            module.predictor(), folder, tmp_path / "out", threshold=0.0, draw=False
        )
    warned = caplog.text
    assert "broken.jpg" in warned and "empty.png" in warned and "notes.txt" not in warned
    records = json.loads(json_path.read_text())
    assert [Path(r["file_name"]).name for r in records] == ["a.png", "c.png"]
    with pytest.raises(ValueError, match=r"broken\.jpg"):  # the API does not skip silently
        module.predict(folder / "broken.jpg")


def test_inputs_that_match_nothing(module, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SetupError, match="empty"):
        predict_files(module.predictor(), empty, tmp_path / "out")
    (empty / "notes.txt").write_text("x")
    with pytest.raises(SetupError, match="no image files"):
        image_files(empty)
    with pytest.raises(SetupError, match="matches no image files"):
        image_files(tmp_path / "*.jpg")
    with pytest.raises(SetupError, match="does not exist"):
        image_files(tmp_path / "missing.jpg")
    save_png(noise(10, 10), tmp_path / "b.png")
    save_png(noise(10, 10), tmp_path / "a.PNG")
    assert [p.name for p in image_files(tmp_path / "*")] == ["a.PNG", "b.png"]


def test_drawing_names_never_collide():
    files = [Path("a/x.png"), Path("b/x.png"), Path("x-2.jpg"), Path("y.jpg")]
    assert _drawing_names(files) == ["x.png", "x-2.png", "x-2-2.png", "y.png"]
