"""The augmentation grid: its size in pixels, boxes where the targets put them, and the
normalization undone exactly."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from detr_lightning.data.presets import IMAGENET_MEAN, IMAGENET_STD
from detr_lightning.data.transforms import NormalizeImage
from detr_lightning.viz.augmentation_grid import (
    BACKGROUND,
    UNNORMALIZED,
    augmentation_grid,
    denormalize,
    grid_size,
)
from detr_lightning.viz.drawing import PALETTE

GREY = (90, 90, 90)  # not a palette colour


def _normalized(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` (uint8 [3, H, W]) as the training transforms hand them to the model."""
    normalize = NormalizeImage(IMAGENET_MEAN, IMAGENET_STD)
    return normalize(tv_tensors.Image(pixels)).as_subclass(torch.Tensor)


def _plain(color: tuple[int, int, int], height: int, width: int) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)


def _color(grid: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    return tuple(grid[:, y, x].tolist())


def _target(cxcywh: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(cxcywh).reshape(-1, 4), "labels": torch.tensor(labels)}


def test_denormalize_undoes_the_training_normalization_exactly():
    pixels = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator())
    normalized = _normalized(pixels)
    assert normalized.dtype == torch.float32 and abs(float(normalized.mean())) < 3
    assert torch.equal(denormalize(normalized), pixels)
    # images in [0, 1] (the originals, read without transforms)
    assert torch.equal(denormalize(pixels / 255.0, *UNNORMALIZED), pixels)
    with pytest.raises(ValueError, match=r"\[3, H, W\], got \(37, 53\)"):
        denormalize(normalized[0])


def test_grid_size_in_pixels():
    # tile 64: caption strip max(12, 64 // 24) + 8 = 20 px, cells 64 + 20 = 84 px high;
    # margins of 16 px around and between the cells; originals 4 px left of their samples
    assert grid_size(5, 3, 64) == (2 * 84 + 3 * 16, 3 * 64 + 4 * 16) == (216, 256)
    assert grid_size(5, 3, 64, with_originals=True) == (216, 3 * (2 * 64 + 4) + 4 * 16)
    assert grid_size(2, 4, 64) == (84 + 2 * 16, 2 * 64 + 3 * 16)  # fewer samples than columns
    assert grid_size(4, 4, 384) == (384 + 24 + 2 * 16, 4 * 384 + 5 * 16)  # 384 // 24 + 8
    with pytest.raises(ValueError, match="columns"):
        grid_size(3, 0, 64)
    sample = (_normalized(_plain(GREY, 30, 40)), _target([], []))
    grid = augmentation_grid([sample] * 5, ["a"], columns=3, tile_size=64)
    assert grid.shape == (3, 216, 256) and grid.dtype == torch.uint8
    with_originals = augmentation_grid(
        [sample] * 5, ["a"], originals=[(_plain(GREY, 30, 40) / 255.0, sample[1])] * 5,
        columns=3, tile_size=64, captions=[f"image {k}" for k in range(5)],
    )  # fmt: skip
    assert with_originals.shape == (3, 216, 460)


def test_boxes_are_drawn_at_their_edges():
    # a 200x400 image with the box x 40..240, y 20..120, scaled by 1/2 to fill the 200 px tile:
    # 100x200 at (16, 16 + (200 - 100) // 2) = (x 16, y 66), the box at x 20..120, y 10..60
    image = _normalized(_plain(GREY, 200, 400))
    target = _target([[140 / 400, 70 / 200, 200 / 400, 100 / 200]], [3])
    grid = augmentation_grid([(image, target)], ["a", "b", "c", "car"], tile_size=200)
    color = PALETTE[3]
    top, left = 66, 16
    middle = top + 50  # the box's middle row, below its caption tab
    # lines 2 px wide (the drawing's minimum), inside the box outline
    assert [_color(grid, middle, left + x) for x in (19, 20, 21, 22)] == [GREY, color, color, GREY]
    assert [_color(grid, middle, left + x) for x in (118, 119, 120, 121)] == [
        GREY, color, color, GREY,
    ]  # fmt: skip
    assert [_color(grid, top + y, left + 70) for y in (58, 59, 60, 61)] == [
        GREY, color, color, GREY,
    ]  # fmt: skip
    assert _color(grid, top + 80, left + 70) == GREY  # inside the box
    assert _color(grid, top - 1, left + 70) == BACKGROUND  # above the image, in its tile
    assert _color(grid, top + 100, left + 70) == BACKGROUND  # below it


def test_originals_are_drawn_left_of_their_samples_with_captions():
    red = (200, 30, 30)
    sample = (_normalized(_plain(GREY, 64, 64)), _target([], []))
    original = (_plain(red, 32, 32) / 255.0, _target([[0.5, 0.5, 0.5, 0.5]], [0]))
    grid = augmentation_grid(
        [sample], ["dog"], originals=[original], captions=["x" * 200], tile_size=64
    )
    assert grid.shape == (3, 64 + 20 + 32, 2 * 64 + 4 + 32)
    assert _color(grid, 16 + 40, 16 + 40) == red  # the original, enlarged to 64x64
    # its box, x and y 16..48 once enlarged: the left edge below the caption tab
    assert [_color(grid, 16 + 40, 16 + x) for x in (15, 16, 17, 18)] == [
        red, PALETTE[0], PALETTE[0], red,
    ]  # fmt: skip
    assert _color(grid, 16 + 40, 16 + 64 + 4 + 40) == GREY  # the sample
    caption_rows = grid[:, 16 + 64 : 16 + 64 + 20]
    cell = caption_rows[:, :, 16 : 16 + 132]
    assert (cell != torch.tensor(BACKGROUND).view(3, 1, 1)).any()  # written
    margin = caption_rows[:, :, 16 + 132 :]
    assert (margin == torch.tensor(BACKGROUND).view(3, 1, 1)).all()  # cut to the cell
    with pytest.raises(ValueError, match="2 captions for 1 samples"):
        augmentation_grid([sample], ["dog"], captions=["a", "b"])
