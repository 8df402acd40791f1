"""Properties of the DETR augmentation presets and the custom v2 transforms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torchvision import tv_tensors

from detr_lightning.data.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    make_train_transforms,
    make_val_transforms,
)
from detr_lightning.data.transforms import (
    RandomShortSideResize,
    RandomSizeCrop,
    boxes_to_normalized_cxcywh,
)

FAST = settings(max_examples=25, deadline=None, database=None)  # no .hypothesis/ in the repo


def make_sample(image: Tensor, boxes: Tensor) -> tuple[tv_tensors.Image, dict[str, Tensor]]:
    """(uint8 image [3,H,W], {"boxes": XYXY [N,4], "labels": 0..N-1}) as the dataset builds it."""
    height, width = image.shape[-2:]
    return tv_tensors.Image(image), {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.arange(len(boxes)),
    }


def denormalize(image: Tensor) -> Tensor:
    """Undo ToDtype + Normalize: float [3,H,W] -> the original uint8 values as int64."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).round().to(torch.int64)


@st.composite
def image_and_boxes(draw: st.DrawFn, min_side: int = 16, max_side: int = 96, min_box: int = 1):
    """A random uint8 image and up to 6 boxes with sides >= ``min_box``, on a 0.25 px grid."""
    height = draw(st.integers(min_side, max_side))
    width = draw(st.integers(min_side, max_side))
    boxes = []
    for _ in range(draw(st.integers(0, 6))):
        x0 = draw(st.integers(0, 4 * (width - min_box))) / 4
        y0 = draw(st.integers(0, 4 * (height - min_box))) / 4
        x1 = draw(st.integers(int(4 * (x0 + min_box)), 4 * width)) / 4
        y1 = draw(st.integers(int(4 * (y0 + min_box)), 4 * height)) / 4
        boxes.append((x0, y0, x1, y1))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def assert_inside(boxes: Tensor, height: int, width: int) -> None:
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


@FAST
@given(image_and_boxes())
def test_flip_mirrors_boxes_exactly(sample: tuple[Tensor, Tensor]) -> None:
    image, boxes = sample
    height, width = image.shape[-2:]
    # the short side is the only scale, so the resize is the identity and only the flip acts
    transforms = make_train_transforms(
        scales=[min(height, width)], max_size=2 * max(height, width), crop=False, flip_probability=1
    )
    out_image, target = transforms(*make_sample(image, boxes))
    assert out_image.dtype == torch.float32 and out_image.shape == image.shape
    assert torch.equal(denormalize(out_image), image.flip(-1).to(torch.int64))
    expected = torch.stack(
        [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
    )
    torch.testing.assert_close(target["boxes"].as_subclass(Tensor), expected)
    assert target["labels"].tolist() == list(range(len(boxes)))


@FAST
@given(image_and_boxes(min_box=4), st.data())
def test_resize_scales_boxes(sample: tuple[Tensor, Tensor], data: st.DataObject) -> None:
    image, boxes = sample
    height, width = image.shape[-2:]
    short = min(height, width)
    scales = data.draw(st.lists(st.integers(short // 2, 2 * short), min_size=1, max_size=4))
    transforms = make_train_transforms(
        scales=scales, max_size=4 * max(height, width), crop=False, flip_probability=0
    )
    out_image, target = transforms(*make_sample(image, boxes))
    new_h, new_w = out_image.shape[-2:]
    assert min(new_h, new_w) in scales
    factor = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
    torch.testing.assert_close(target["boxes"].as_subclass(Tensor), boxes * factor)
    assert target["labels"].tolist() == list(range(len(boxes)))


@FAST
@given(image_and_boxes(), st.data())
def test_multi_scale_sizes_respect_max_size(
    sample: tuple[Tensor, Tensor], data: st.DataObject
) -> None:
    image, boxes = sample
    scales = data.draw(st.lists(st.integers(8, 64), min_size=1, max_size=4))
    max_size = data.draw(st.integers(max(scales) + 1, 100))
    transforms = make_train_transforms(scales=scales, max_size=max_size, crop=False)
    out_image, target = transforms(*make_sample(image, boxes))
    new_h, new_w = out_image.shape[-2:]
    assert max(new_h, new_w) <= max_size
    assert min(new_h, new_w) in scales or max(new_h, new_w) == max_size
    assert_inside(target["boxes"], new_h, new_w)
    assert len(target["labels"]) == len(target["boxes"])


@FAST
@given(image_and_boxes(min_side=24), st.data())
def test_crop_branch_shifts_clamps_and_drops(
    sample: tuple[Tensor, Tensor], data: st.DataObject
) -> None:
    _, boxes = sample
    height, width = sample[0].shape[-2:]
    # pixels encode their own coordinates, so the output reveals where the crop was taken
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8)
    size = data.draw(st.integers(8, min(height, width)))
    # a square crop of `size`, with identity resizes before (short side kept) and after it
    transforms = make_train_transforms(
        scales=[size],
        max_size=4 * max(height, width),
        crop_resize=[min(height, width)],
        crop_min=size,
        crop_max=size,
        crop_probability=1,
        flip_probability=0,
    )
    out_image, target = transforms(*make_sample(image, boxes))
    assert out_image.shape[-2:] == (size, size)
    pixels = denormalize(out_image)
    left, top = int(pixels[0, 0, 0]), int(pixels[1, 0, 0])
    assert torch.equal(pixels[0, 0], left + torch.arange(size))
    assert torch.equal(pixels[1, :, 0], top + torch.arange(size))

    shifted = (boxes - torch.tensor([left, top, left, top])).clamp(0, size)
    widths, heights = shifted[:, 2] - shifted[:, 0], shifted[:, 3] - shifted[:, 1]
    keep = (widths >= 1) & (heights >= 1) & (widths * heights >= 1)
    torch.testing.assert_close(target["boxes"].as_subclass(Tensor), shifted[keep])
    assert target["labels"].tolist() == torch.nonzero(keep).flatten().tolist()


@FAST
@given(image_and_boxes(), st.integers(0, 2**16))
def test_default_style_preset_keeps_boxes_valid(sample: tuple[Tensor, Tensor], seed: int) -> None:
    image, boxes = sample
    torch.manual_seed(seed)
    scales = [32, 40, 48, 56]
    transforms = make_train_transforms(
        scales=scales, max_size=90, crop_resize=[24, 40, 60], crop_min=12, crop_max=40
    )
    out_image, target = transforms(*make_sample(image, boxes))
    new_h, new_w = out_image.shape[-2:]
    assert max(new_h, new_w) <= 90
    assert min(new_h, new_w) in scales or max(new_h, new_w) == 90
    assert_inside(target["boxes"], new_h, new_w)
    labels = target["labels"].tolist()
    assert labels == sorted(set(labels)) and len(labels) == len(target["boxes"])
    normalized = boxes_to_normalized_cxcywh(target["boxes"], (new_h, new_w))
    assert ((normalized >= 0) & (normalized <= 1)).all()


def test_random_size_crop_window_and_offset() -> None:
    torch.manual_seed(0)
    crop = RandomSizeCrop(10, 30)
    boxes = torch.tensor([[0.0, 0.0, 50.0, 40.0], [5.0, 6.0, 15.0, 16.0], [44.0, 2.0, 48.0, 9.0]])
    image, target = make_sample(torch.zeros(3, 40, 50, dtype=torch.uint8), boxes)
    for _ in range(50):
        params = crop.make_params([image, target["boxes"]])
        top, left, height, width = (params[k] for k in ("top", "left", "height", "width"))
        assert 10 <= height <= 30 and 10 <= width <= 30
        assert top + height <= 40 and left + width <= 50
        cropped = crop.transform(target["boxes"], params)
        assert tuple(cropped.canvas_size) == (height, width)
        offset = torch.tensor([left, top, left, top], dtype=torch.float32)
        limit = torch.tensor([width, height, width, height], dtype=torch.float32)
        expected = torch.minimum((boxes - offset).clamp(min=0), limit)
        torch.testing.assert_close(cropped.as_subclass(Tensor), expected)
        assert crop.transform(image, params).shape == (3, height, width)


def test_random_size_crop_small_image_is_kept_whole() -> None:
    image, target = make_sample(torch.zeros(3, 8, 9, dtype=torch.uint8), torch.zeros(0, 4))
    out_image, _ = RandomSizeCrop(20, 30)(image, target)
    assert out_image.shape == (3, 8, 9)


def test_val_transforms_sizes() -> None:
    transforms = make_val_transforms(val_size=64, max_size=100)
    for height, width, expected in [(32, 48, (64, 96)), (40, 100, (40, 100)), (64, 64, (64, 64))]:
        boxes = torch.tensor([[0.0, 0.0, width, height]])
        out_image, target = transforms(*make_sample(torch.zeros(3, height, width).byte(), boxes))
        assert out_image.shape[-2:] == expected
        new_h, new_w = expected
        torch.testing.assert_close(
            target["boxes"].as_subclass(Tensor), torch.tensor([[0.0, 0.0, new_w, new_h]])
        )


@pytest.mark.parametrize(("height", "width"), [(100, 200), (200, 100), (150, 150)])
def test_max_size_at_or_below_the_short_side_size(height: int, width: int) -> None:
    """A long-side cap at or below the short-side size is valid (evaluation at small sizes
    used to be rejected): the long side is exactly the cap."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for max_size in (160, 800):
        out = make_val_transforms(val_size=800, max_size=max_size)(tv_tensors.Image(image))
        expected = (max_size * height // max(height, width), max_size * width // max(height, width))
        assert tuple(out.shape[-2:]) == expected


def test_normalized_cxcywh_by_hand() -> None:
    boxes = torch.tensor([[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 100.0, 50.0]])
    expected = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(boxes_to_normalized_cxcywh(boxes, (50, 100)), expected)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="max_size must be positive"):
        RandomShortSideResize([480, 800], max_size=0)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        RandomSizeCrop(50, 10)
    with pytest.raises(ValueError, match="crop_probability"):
        make_train_transforms(crop_probability=1.5)


def test_normalize_image_equals_todtype_and_normalize() -> None:
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from detr_lightning.data.presets import IMAGENET_MEAN, IMAGENET_STD
    from detr_lightning.data.transforms import NormalizeImage

    image = tv_tensors.Image(torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8))
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)  # fmt: skip
    ours = NormalizeImage(IMAGENET_MEAN, IMAGENET_STD)(image)
    assert isinstance(ours, tv_tensors.Image) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-6)
    as_float = NormalizeImage(IMAGENET_MEAN, IMAGENET_STD)(tv_tensors.Image(image / 255.0))
    torch.testing.assert_close(as_float, reference, atol=1e-5, rtol=1e-6)


def test_clamp_and_drop_tiny_boxes_equals_torchvision() -> None:
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    from detr_lightning.data.transforms import ClampAndDropTinyBoxes

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 2, generator=generator) * 70 - 10
    sizes = torch.rand(200, 2, generator=generator) * 30 - 2
    boxes = tv_tensors.BoundingBoxes(torch.cat([corners, corners + sizes], 1), format="XYXY",
                                     canvas_size=(40, 50))  # fmt: skip
    target = {"boxes": boxes, "labels": torch.arange(200)}
    image = tv_tensors.Image(torch.zeros(3, 40, 50))
    _, expected = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()])(image, target)
    _, ours = ClampAndDropTinyBoxes()(image, target)
    assert 20 < len(ours["labels"]) < 200  # some boxes dropped, some kept
    assert torch.equal(ours["labels"], expected["labels"])
    torch.testing.assert_close(ours["boxes"].as_subclass(torch.Tensor),
                               expected["boxes"].as_subclass(torch.Tensor))  # fmt: skip
    assert ours["boxes"].canvas_size == (40, 50)


def test_random_select_takes_the_second_branch_with_probability_p() -> None:
    from detr_lightning.data.transforms import RandomSelect

    select = RandomSelect(lambda x: 0, lambda x: 1, p=0.3)
    torch.manual_seed(0)
    share = sum(select(None) for _ in range(4000)) / 4000
    assert abs(share - 0.3) < 0.03
    assert RandomSelect(lambda x: 0, lambda x: 1, p=0.0)(None) == 0
    with pytest.raises(ValueError, match="p must lie"):
        RandomSelect(lambda x: 0, lambda x: 1, p=1.5)
