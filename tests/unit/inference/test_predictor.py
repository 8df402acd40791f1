"""The Predictor: formats, selection, batching invariance, image inputs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detr_lightning.inference.predictor as predictor_module
from detr_lightning import DETRModule
from detr_lightning.data.images import inference_transform, read_image
from detr_lightning.ops.boxes import box_cxcywh_to_xyxy
from helpers.data import noise, save_png
from helpers.models import VARIED_DATA as DATA
from helpers.models import VARIED_LABEL_MAP as LABEL_MAP
from helpers.models import varied_module

KEYS = {"scores", "labels", "names", "category_ids", "boxes", "queries"}


@pytest.fixture(scope="module")
def module() -> DETRModule:
    return varied_module()


def assert_same(actual: dict, expected: dict, atol: float, size: tuple[int, int] = (1, 1)):
    """Same detections; boxes compared in units of the image ``size`` (height, width)."""
    assert set(actual) == KEYS
    assert torch.equal(actual["labels"], expected["labels"])
    assert torch.equal(actual["queries"], expected["queries"])
    assert actual["names"] == expected["names"]
    torch.testing.assert_close(actual["scores"], expected["scores"], atol=atol, rtol=0)
    scale = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
    torch.testing.assert_close(
        actual["boxes"] / scale, expected["boxes"] / scale, atol=atol, rtol=0
    )


def by_hand(module: DETRModule, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every query's best real class, score and box in original pixels, from the raw model."""
    model_input = inference_transform(DATA)(pixels)
    with torch.no_grad():
        outputs = module.model(model_input[None])
    scores, labels = outputs["pred_logits"][0].softmax(-1)[:, :-1].max(-1)
    height, width = pixels.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"][0]) * scale
    return {"scores": scores, "labels": labels, "boxes": boxes}


# ------------------------------------------------------------------------------------ API
def test_format_and_boxes_in_original_pixels(module):
    pixels = noise(90, 130)
    (result,) = module.predict(pixels, threshold=0.0)
    assert set(result) == KEYS
    assert result["scores"].dtype == torch.float32 and result["boxes"].shape[1] == 4
    assert result["labels"].dtype == result["queries"].dtype == torch.int64
    expected = by_hand(module, pixels)
    used = expected["labels"] != 1
    order = expected["scores"][used].argsort(descending=True)
    queries = used.nonzero().flatten()[order]
    assert torch.equal(result["queries"], queries)
    torch.testing.assert_close(result["scores"], expected["scores"][queries], atol=1e-5, rtol=0)
    torch.testing.assert_close(result["boxes"], expected["boxes"][queries], atol=1e-4, rtol=0)
    assert torch.equal(result["labels"], expected["labels"][queries])
    assert result["names"] == [LABEL_MAP["names"][i] for i in result["labels"].tolist()]
    assert result["category_ids"].tolist() == [
        LABEL_MAP["category_ids"][i] for i in result["labels"].tolist()
    ]
    result["boxes"].clamp_(min=0)  # ordinary tensors, not inference-mode ones


def test_threshold_top_k_and_unused_labels(module):
    pixels = noise(90, 130, seed=1)
    assert (by_hand(module, pixels)["labels"] == 1).any(), "the unused label must be in play"
    everything = module.predict(pixels, threshold=0.0)[0]
    assert 1 not in everything["labels"].tolist() and -1 not in everything["category_ids"]
    assert (everything["scores"].diff() <= 0).all()  # best first
    threshold = float(everything["scores"].median())
    kept = module.predict(pixels, threshold=threshold)[0]
    assert (kept["scores"] > threshold).all()
    assert len(kept["scores"]) == int((everything["scores"] > threshold).sum()) > 0
    top = module.predict(pixels, threshold=0.0, top_k=2)[0]
    assert torch.equal(top["queries"], everything["queries"][:2])
    assert len(module.predict(pixels, threshold=1.0)[0]["scores"]) == 0
    with pytest.raises(ValueError, match="threshold"):
        module.predict(pixels, threshold=1.5)
    with pytest.raises(ValueError, match="top_k"):
        module.predict(pixels, top_k=0)


def test_batches_give_the_detections_of_one_by_one(module):
    # preprocessed sizes 48x72, 48x48, 48x72, 48x48, 24x72, 48x72: three buckets, none padded
    sizes = [(80, 120), (100, 100), (40, 60), (120, 120), (50, 150), (160, 240)]
    images = [noise(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    single = [module.predict(image, threshold=0.0)[0] for image in images]
    batched = module.predict(images, threshold=0.0, batch_size=4)
    assert len(batched) == len(images)
    # float32 pixel coordinates of a 240-pixel image round at ~1.5e-5: compare relative boxes
    for actual, expected, size in zip(batched, single, sizes):
        assert_same(actual, expected, atol=1e-5, size=size)


def test_images_are_read_lazily_and_few_are_held(module):
    """batch_size 2: at most 4 images wait for a batch, so results come before the input ends."""
    sizes = [(48, 72), (48, 48), (24, 72), (72, 48), (40, 60), (30, 30)]  # five model sizes
    consumed = []

    def sources():
        for i, (height, width) in enumerate(sizes):
            consumed.append(i)
            yield noise(height, width, seed=i)

    seen = []
    for image, _ in module.predictor().iter_predictions(sources(), threshold=0.0, batch_size=2):
        seen.append((image.index, len(consumed)))
    assert sorted(index for index, _ in seen) == list(range(len(sizes)))
    assert seen[0] == (0, 4)  # the 4th waiting image made the first (largest, oldest) bucket go


def test_input_kinds_agree(module, tmp_path):
    pixels = noise(70, 110, seed=2)
    path = save_png(pixels, tmp_path / "image.png")
    expected = module.predict(pixels, threshold=0.0)[0]
    for source in (path, str(path), Image.open(path), pixels.float() / 255, pixels[None]):
        assert_same(module.predict(source, threshold=0.0)[0], expected, atol=0)


def test_bf16_and_device_keep_the_format(module):
    (result,) = module.predict(noise(64, 96), threshold=0.0, bf16=True, device="cpu")
    assert set(result) == KEYS and result["scores"].dtype == torch.float32
    assert not module.training


def test_bf16_batches_after_the_first_give_the_detections_of_single_calls(module, monkeypatch):
    """From its second batch on, a bf16 call runs the model's bf16 inference copy: built once
    per call, and the same detections as a call per image on the original model."""
    images = [noise(64, 96, seed=seed) for seed in (3, 4, 5)]
    singles = [module.predict(image, threshold=0.0, bf16=True)[0] for image in images]
    copies = []
    original = predictor_module.bf16_inference_copy

    def counted(model):
        copies.append(model)
        return original(model)

    monkeypatch.setattr(predictor_module, "bf16_inference_copy", counted)
    streamed = module.predict(images, threshold=0.0, bf16=True)
    assert len(copies) == 1
    for actual, expected in zip(streamed, singles, strict=True):
        assert_same(actual, expected, atol=0)
    assert all(p.dtype == torch.float32 for p in module.model.parameters())


def test_very_large_image(module, tmp_path):
    pixels = torch.zeros(3, 3000, 5000, dtype=torch.uint8)
    pixels[0] = torch.linspace(0, 255, 5000).to(torch.uint8)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "large.jpg", quality=80)
    (result,) = module.predict(tmp_path / "large.jpg", threshold=0.0)
    assert len(result["scores"]) > 0
    # boxes live in the 5000 x 3000 original (predicted cxcywh in [0, 1] -> at most 1.5x out)
    assert result["boxes"][:, 2].max() > 100 and result["boxes"].abs().max() < 1.5 * 5000


# ------------------------------------------------------------------------------ image files
def _png16(path: Path, values: np.ndarray, color_type: int) -> Path:
    """Write a 16-bit PNG (color type 0 grey, 2 RGB, 6 RGBA) from uint16 [H, W(, C)]."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def _palette(image: Image.Image) -> Image.Image:
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 0)
    return image


def _filled(rgb: tuple[int, int, int], corner: tuple[int, int, int] | None = None):
    expected = torch.tensor(rgb, dtype=torch.uint8)[:, None, None].repeat(1, 4, 5)
    if corner is not None:
        expected[:, 0, 0] = torch.tensor(corner)
    return expected


def _write_mode_case(case: str, path: Path) -> tuple[Path, torch.Tensor]:
    """Write a 5x4 file of kind ``case``; returns it with the uint8 RGB it should read as."""
    white = (255, 255, 255)
    if case == "L":
        Image.new("L", (5, 4), 100).save(path := path / "grey.png")
        return path, _filled((100, 100, 100))
    if case == "LA":
        image = Image.new("LA", (5, 4), (100, 255))
        image.putpixel((0, 0), (0, 0))
        image.save(path := path / "grey_alpha.png")
        return path, _filled((100, 100, 100), corner=white)
    if case == "P_transparent":
        _palette(Image.new("P", (5, 4), 1)).save(path := path / "palette.png", transparency=0)
        return path, _filled((200, 100, 50), corner=white)
    if case == "P_opaque":
        _palette(Image.new("P", (5, 4), 1)).save(path := path / "palette_opaque.png")
        return path, _filled((200, 100, 50), corner=(10, 20, 30))
    if case == "GIF_transparent":
        _palette(Image.new("P", (5, 4), 1)).save(path := path / "palette.gif", transparency=0)
        return path, _filled((200, 100, 50), corner=white)
    if case == "RGBA":
        image = Image.new("RGBA", (5, 4), (10, 20, 30, 255))
        image.putpixel((0, 0), (10, 20, 30, 0))
        image.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black on white: grey 127
        image.save(path := path / "rgba.png")
        expected = _filled((10, 20, 30), corner=white)
        expected[:, 0, 1] = 127
        return path, expected
    if case == "CMYK":
        Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(path := path / "cmyk.jpg", quality=100)
        return path, _filled((255, 0, 0))
    if case == "grey16":
        Image.fromarray(np.full((4, 5), 200 * 257, dtype=np.uint16)).save(path := path / "g16.png")
        return path, _filled((200, 200, 200))
    if case == "RGB16":
        values = np.zeros((4, 5, 3), dtype=np.uint16)
        values[...] = (65535, 100 * 257, 0)
        return _png16(path / "rgb16.png", values, 2), _filled((255, 100, 0))
    raise AssertionError(case)


MODE_CASES = ["L", "LA", "P_transparent", "P_opaque", "GIF_transparent", "RGBA", "CMYK",
              "grey16", "RGB16"]  # fmt: skip


@pytest.mark.parametrize("case", MODE_CASES)
def test_image_modes_read_as_rgb(case, tmp_path):
    path, expected = _write_mode_case(case, tmp_path)
    pixels = read_image(path)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 4, 5)
    atol = 3 if case == "CMYK" else 0  # JPEG
    torch.testing.assert_close(pixels, expected, atol=atol, rtol=0)
    with Image.open(path) as opened:  # the same from a PIL image
        torch.testing.assert_close(read_image(opened), expected, atol=atol, rtol=0)


def test_converted_files_predict_like_their_pixels(module, tmp_path):
    cases = [_write_mode_case(case, tmp_path) for case in ("LA", "P_transparent", "grey16")]
    paths, expected = zip(*cases)  # all 5 x 4: one batch each
    from_files = module.predict(list(paths), threshold=0.0, batch_size=3)
    from_pixels = module.predict(list(expected), threshold=0.0, batch_size=3)
    for actual, wanted in zip(from_files, from_pixels):
        assert_same(actual, wanted, atol=0)


def test_exif_orientation_is_applied(module, tmp_path):
    # stored 60 wide x 40 high, top half red; orientation 6 = rotate 90 degrees clockwise
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 60, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path := tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    pixels = read_image(path)
    assert pixels.shape == (3, 60, 40)
    assert pixels[0, 30, 35] > 200 and pixels[2, 30, 35] < 50  # red now on the right
    assert pixels[2, 30, 5] > 200 and pixels[0, 30, 5] < 50
    (result,) = module.predict(path, threshold=0.0)
    assert_same(result, module.predict(pixels, threshold=0.0)[0], atol=0)
