"""The paper's attention figures as PNG panels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from detr_lightning.inference.attention import detect_with_attention
from detr_lightning.viz.attention_figures import (
    attention_panels,
    plot_decoder_attention,
    plot_encoder_attention,
)
from helpers.data import write_street_image
from helpers.models import confident_module


@pytest.fixture
def image_file(tmp_path):
    return write_street_image(tmp_path / "street.png")


def open_png(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as png:
        assert png.format == "PNG"
        return png.size  # (width, height)


def test_attention_panels_write_both_figures(image_file, tmp_path) -> None:
    module = confident_module(confident_label=1)
    module.train()  # put back in eval for the pass, then back in training mode
    out_dir = tmp_path / "panels"
    paths = attention_panels(module.predictor(), image_file, out_dir, threshold=0.3)
    assert module.training and module.model.training
    assert paths == [out_dir / "street_decoder.png", out_dir / "street_encoder.png"]
    decoder_width, decoder_height = open_png(paths[0])
    encoder_width, encoder_height = open_png(paths[1])
    # 7 detections: 7 columns of map-over-box
    assert 1_200 < decoder_width <= 2_000 and 250 < decoder_height < decoder_width
    # the image + one map per box centre, the centres in distinct feature cells (up to 4)
    found = detect_with_attention(module.predictor(), image_file, threshold=0.3)
    centres = ((found.boxes[:, :2] + found.boxes[:, 2:]) / 2).tolist()
    cells = {(int(y * 4 / 150), int(x * 7 / 230)) for x, y in centres}
    panels = 1 + min(len(cells), 4)
    assert panels * 200 < encoder_width < panels * 300 and encoder_height < 300
    # no detection: the image alone, and the encoder maps at 4 spread points
    paths = attention_panels(
        module.predictor(), image_file, out_dir, threshold=0.9999, stem="empty"
    )
    assert [path.name for path in paths] == ["empty_decoder.png", "empty_encoder.png"]
    empty_width, empty_height = open_png(paths[0])
    assert 150 < empty_width < decoder_width / 3 and empty_height < decoder_height
    assert 5 * 200 < open_png(paths[1])[0] < 5 * 300  # 4 points + the image


def test_attention_panels_from_a_tensor_with_points(tmp_path) -> None:
    module = confident_module(confident_label=4)  # detects nothing
    image = torch.randint(0, 256, (3, 90, 60), dtype=torch.uint8)
    paths = attention_panels(module.predictor(), image, tmp_path, points=[(10, 10), (80, 50)])
    assert [path.name for path in paths] == ["image_decoder.png", "image_encoder.png"]
    width, height = open_png(paths[1])
    assert height > width / 3  # the image and 2 maps, of a tall image
    assert width < open_png(paths[0])[0] * 4


def test_decoder_panel_wraps_after_eight_columns(tmp_path) -> None:
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0]])

    def panel(count: int) -> tuple[int, int]:
        maps = torch.rand(count, 4, 5).softmax(0)
        path = plot_decoder_attention(
            image,
            boxes.expand(count, 4),
            [f"d{i}" for i in range(count)],
            maps,
            tmp_path / f"{count}.png",
        )
        return open_png(path)

    (width_8, height_8), (width_11, height_11), (width_2, _) = panel(8), panel(11), panel(2)
    assert width_11 == width_8 and width_2 < width_8 / 3  # at most 8 columns
    assert height_11 > 1.8 * height_8  # a second row of map-over-box pairs
    # many detections of a tall image stay within the size bound (20 x 24 inches at 100 dpi)
    image = torch.randint(0, 256, (3, 200, 100), dtype=torch.uint8)
    width_24, height_24 = panel(24)
    assert width_24 <= 2_000 and 2_000 < height_24 <= 2_400


def test_plots_reject_inconsistent_inputs(tmp_path) -> None:
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    with pytest.raises(ValueError, match="captions"):
        plot_decoder_attention(
            image, torch.zeros(2, 4), ["one"], torch.rand(2, 2, 2), tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="uint8"):
        plot_decoder_attention(
            image.float(), torch.zeros(0, 4), [], torch.rand(0, 2, 2), tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="outside"):
        plot_encoder_attention(image, torch.rand(2, 2, 2, 2), [(40, 5)], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[h, w, h, w\]"):
        plot_encoder_attention(image, torch.rand(2, 2, 3, 2), [(4, 5)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
