"""detr-predict (predict.py): checkpoints, devices, malloc, drawings and attention panels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_lightning import DETRModule, load_pretrained, save_pretrained
from detr_lightning.cli.predict import predict_cli
from detr_lightning.utils.errors import SetupError
from detr_lightning.viz.drawing import drawing_scale
from helpers.data import noise, save_png
from helpers.models import varied_module
from helpers.pipeline import compose_config


@pytest.fixture(scope="module")
def module() -> DETRModule:
    return varied_module()


@pytest.fixture(scope="module")
def export_dir(module, tmp_path_factory) -> Path:
    return save_pretrained(module, tmp_path_factory.mktemp("export"))


# ------------------------------------------------------------------------------------ CLI
def _cli_config(tmp_path: Path, *overrides: str):
    return compose_config("predict", [f"run_dir={tmp_path / 'run'}", "device=cpu", *overrides])


def test_cli_needs_a_checkpoint_that_exists(tmp_path):
    save_png(noise(10, 10), tmp_path / "a.png")
    with pytest.raises(SetupError, match="pretrained=PATH"):
        predict_cli(_cli_config(tmp_path, f"input={tmp_path}"))
    missing = tmp_path / "nope.pth"
    with pytest.raises(SetupError, match=r"nope\.pth"):
        predict_cli(_cli_config(tmp_path, f"input={tmp_path}", f"pretrained={missing}"))
    with pytest.raises(SetupError, match="input="):
        predict_cli(_cli_config(tmp_path, f"ckpt_path={tmp_path / 'a.png'}"))
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_pretrained(missing)
    for bad in ("0", "true", "auto"):
        overrides = [f"input={tmp_path}", f"pretrained={tmp_path}", f"static_shapes={bad}"]
        with pytest.raises(SetupError, match=f"(?i)static_shapes={bad}: give the number"):
            predict_cli(_cli_config(tmp_path, *overrides))
    overrides = [f"input={tmp_path}", f"pretrained={tmp_path}", "reuse_freed_memory=1"]
    with pytest.raises(SetupError, match="reuse_freed_memory=1: true"):
        predict_cli(_cli_config(tmp_path, *overrides))


def test_cli_fails_when_no_image_reads_or_the_device_is_missing(export_dir, tmp_path, monkeypatch):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a JPEG")
    cfg = _cli_config(tmp_path, f"pretrained={export_dir}", f"input={broken}")
    with pytest.raises(SetupError, match=r"none of the 1 image\(s\) could be read"):
        predict_cli(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cli_config(tmp_path, f"pretrained={export_dir}", f"input={broken}", "device=cuda")
    with pytest.raises(SetupError, match=r"device=cuda: no CUDA device here"):
        predict_cli(cfg)


def test_cli_end_to_end(module, export_dir, tmp_path, capsys, malloc_calls):
    folder = tmp_path / "photos"
    folder.mkdir()
    sizes = {"one.png": (90, 130), "two.jpg": (100, 100), "three.png": (60, 140)}
    for i, (name, (height, width)) in enumerate(sizes.items()):
        Image.fromarray(noise(height, width, seed=10 + i).permute(1, 2, 0).numpy()).save(
            folder / name, quality=95
        )
    cfg = _cli_config(
        tmp_path, f"pretrained={export_dir}", f"input={folder}", "threshold=0.0", "batch_size=2"
    )
    json_path = predict_cli(cfg)
    assert json_path == tmp_path / "run" / "detections.json"
    assert "3 image(s)" in capsys.readouterr().out
    assert malloc_calls == ["reuse"]  # a CPU run sets malloc to reuse freed memory

    records = json.loads(json_path.read_text())
    assert [Path(r["file_name"]).name for r in records] == sorted(sizes)
    loaded = load_pretrained(export_dir)
    for record in records:
        name = Path(record["file_name"]).name
        assert (record["height"], record["width"]) == sizes[name]
        expected = loaded.predict(folder / name, threshold=0.0)[0]
        detections = record["detections"]
        assert [d["name"] for d in detections] == expected["names"]
        assert [d["category_id"] for d in detections] == expected["category_ids"].tolist()
        assert all(d["file_name"] == record["file_name"] for d in detections)
        scores = torch.tensor([d["score"] for d in detections])
        torch.testing.assert_close(scores, expected["scores"], atol=1e-5, rtol=0)
        x0, y0, x1, y1 = expected["boxes"].unbind(1)
        xywh = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1)
        bbox = torch.tensor([d["bbox"] for d in detections])
        torch.testing.assert_close(bbox, xywh, atol=0.011, rtol=0)
        drawing = json_path.parent / record["drawing"]
        assert drawing == json_path.parent / "drawn" / f"{Path(name).stem}.png"
        with Image.open(drawing) as drawn:
            scale = drawing_scale(*sizes[name])
            assert drawn.size == (sizes[name][1] * scale, sizes[name][0] * scale)


def test_cli_sets_malloc_on_the_cpu_only(module, export_dir, tmp_path, monkeypatch, malloc_calls):
    """reuse_freed_memory is for CPU runs: a CUDA run leaves malloc alone (the prediction
    itself is stubbed: no GPU needed)."""
    save_png(noise(20, 30), tmp_path / "a.png")

    devices = []

    def predict_files(predictor, files, run_dir, **options):
        devices.append(options["device"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "detections.json").write_text('[{"file_name": "a.png", "detections": []}]')
        return run_dir / "detections.json"

    monkeypatch.setattr("detr_lightning.cli.predict.predict_files", predict_files)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cli_config(tmp_path, f"pretrained={export_dir}", f"input={tmp_path / 'a.png'}")
    cfg.device = "cuda"
    predict_cli(cfg)
    assert malloc_calls == []
    cfg.device = "cpu"
    predict_cli(cfg)
    assert malloc_calls == ["reuse"]
    assert devices == ["cuda", "cpu"]


def test_cli_attention_panels(module, export_dir, tmp_path, capsys, malloc_calls):
    """attention=true adds the paper's decoder and encoder panels of each readable image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(noise(90, 130, seed=3).permute(1, 2, 0).numpy()).save(folder / "a.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    cfg = _cli_config(tmp_path, f"pretrained={export_dir}", f"input={folder}",
                      "threshold=0.0", "attention=true", "draw=false",
                      "reuse_freed_memory=false")  # fmt: skip
    predict_cli(cfg)
    assert malloc_calls == []
    out = capsys.readouterr().out
    assert "attention panels of 1 image(s)" in out
    panels = sorted(p.name for p in (tmp_path / "run" / "attention").iterdir())
    assert panels == ["a_decoder.png", "a_encoder.png"]
    for name in panels:
        with Image.open(tmp_path / "run" / "attention" / name) as panel:
            assert min(panel.size) > 100
