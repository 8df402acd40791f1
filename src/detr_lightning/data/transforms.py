"""Detection transforms missing from ``torchvision.transforms.v2``, and the target conversion.

Transforms act on ``(image, target)`` with ``image`` a ``tv_tensors.Image`` [3, H, W] and
``target["boxes"]`` a ``tv_tensors.BoundingBoxes`` in absolute XYXY pixels; torchvision moves the
boxes along with the image. The model wants normalized cxcywh instead, which
:func:`boxes_to_normalized_cxcywh` produces once all transforms ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..ops.boxes import mask_boxes

__all__ = [
    "ClampAndDropTinyBoxes",
    "NormalizeImage",
    "RandomSelect",
    "RandomShortSideResize",
    "RandomSizeCrop",
    "boxes_to_normalized_cxcywh",
    "resized_size",
    "spatial_size",
]


def spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(height, width) of the first image (or, without one, boxes) of a flattened sample."""
    for inpt in flat_inputs:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes)):
            height, width = F.get_size(inpt)
            return int(height), int(width)
    raise ValueError(
        "found no tv_tensors.Image or tv_tensors.BoundingBoxes in the sample; wrap the image "
        "with tv_tensors.Image before applying detection transforms"
    )


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], from torch's generator (seeded per DataLoader worker)."""
    return int(torch.randint(low, high + 1, ()))


class RandomSizeCrop(v2.Transform):
    """Crop a random window whose height and width are each uniform in [min_size, max_size].

    Both bounds are clipped to the image, so an image smaller than ``min_size`` is kept whole on
    that side. The window's position is uniform over the image. Boxes are shifted by the window
    offset and clamped to it; boxes left empty are dropped later by ``SanitizeBoundingBoxes``.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(
                f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size} and {max_size}"
            )
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Pick the window: dict with ``top``, ``left``, ``height``, ``width`` in pixels."""
        image_h, image_w = spatial_size(flat_inputs)
        height = int(
            torch.randint(min(self.min_size, image_h), min(self.max_size, image_h) + 1, ())
        )
        width = int(torch.randint(min(self.min_size, image_w), min(self.max_size, image_w) + 1, ()))
        top = _randint(0, image_h - height)
        left = _randint(0, image_w - width)
        return {"top": top, "left": left, "height": height, "width": width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Crop one input (image, boxes, mask) with the window from :meth:`make_params`."""
        return self._call_kernel(F.crop, inpt, **params)

    # torchvision < 0.21 calls the private names.
    _get_params = make_params
    _transform = transform


def boxes_to_normalized_cxcywh(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Absolute XYXY pixels [N, 4] -> float32 [N, 4] cxcywh divided by the image (w, h, w, h).

    ``size`` is the (height, width) of the image the boxes live in.
    """
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    cxcywh = box_convert(boxes.as_subclass(Tensor).to(torch.float32), "xyxy", "cxcywh")
    return cxcywh / scale


class RandomShortSideResize(v2.Transform):
    """Resize so the short side is a random choice of ``sizes``, the long side <= ``max_size``.

    The short side is exactly the chosen size unless the long side would exceed ``max_size``;
    then the long side is exactly ``max_size`` and the short side scales with it (aspect ratio
    kept). A ``max_size`` at or below a size is a valid cap (e.g. evaluation at 160 px). Boxes
    scale with the image.

    torchvision's ``v2.RandomShortestSize`` picks the same scale but truncates ``side * ratio``
    in floating point, so a capped long side often lands one pixel short of ``max_size`` (and
    the short side one short of its size); ``F.resize`` with ``max_size`` computes the capped
    side exactly, which is why this wraps ``F.resize``.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        if not self.sizes or min(self.sizes) <= 0:
            raise ValueError(f"sizes must be a non-empty list of positive ints, got {sizes}")
        if max_size is not None and max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Pick the short-side size: dict with ``size``."""
        return {"size": self.sizes[int(torch.randint(len(self.sizes), ()))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one input (image, boxes, mask)."""
        size = params["size"]
        if self.max_size is not None and self.max_size <= size:
            # the long side (>= the short side) always hits the cap first: resize by it alone
            return self._call_kernel(
                F.resize, inpt, size=None, max_size=self.max_size, antialias=True
            )
        return self._call_kernel(
            F.resize, inpt, size=[size], max_size=self.max_size, antialias=True
        )

    _get_params = make_params
    _transform = transform


def resized_size(
    height: int, width: int, size: int, max_size: int | None = None
) -> tuple[int, int]:
    """(height, width) that :class:`RandomShortSideResize` gives an image of ``height`` x
    ``width`` for the short-side ``size``: the new sides are truncated to whole pixels (floor),
    never rounded. Spelled out (it is torchvision's rule), with ``short <= long`` the sides:

    - ``max_size <= size``: long = ``max_size``, short = ``floor(max_size * short / long)``;
    - else short = ``size``, long = ``floor(size * long / short)``, and if that long exceeds
      ``max_size``: short = ``floor(max_size * size / long)`` (this floored long), long =
      ``max_size``.
    """
    short, long = sorted((int(height), int(width)))
    if max_size is not None and max_size <= size:
        new_short, new_long = int(max_size * short / long), max_size
    else:
        new_short, new_long = size, int(size * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


class RandomSelect(torch.nn.Module):
    """Apply ``first`` with probability ``1 - p``, else ``second`` (one uniform draw).

    ``v2.RandomChoice`` draws with ``torch.multinomial``, which costs more than the resize it
    selects on small images."""

    def __init__(self, first: Any, second: Any, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.first, self.second, self.p = first, second, p

    def forward(self, *inputs: Any) -> Any:
        branch = self.second if float(torch.rand(())) < self.p else self.first
        return branch(*inputs)


class ClampAndDropTinyBoxes(torch.nn.Module):
    """Clamp ``target["boxes"]`` (XYXY) to the image and drop boxes under 1 pixel wide or
    high, with their labels: ``v2.ClampBoundingBoxes`` + ``v2.SanitizeBoundingBoxes`` in one
    step, without their generic input handling (a sizeable share of a small sample's time).
    With ``target["masks"]`` [N, H, W] (segmentation), each box is made that of its mask's
    pixels (a crop may leave less of an object than the clamped box holds), an object whose
    mask the crop left empty goes, and the masks follow the boxes."""

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        boxes = target["boxes"]
        height, width = boxes.canvas_size
        plain = boxes.as_subclass(Tensor)
        limits = plain.new_tensor([width, height, width, height])
        clamped = torch.minimum(plain.clamp(min=0), limits)
        keep = ((clamped[:, 2] - clamped[:, 0]) >= 1) & ((clamped[:, 3] - clamped[:, 1]) >= 1)
        target = dict(target)
        masks = target.get("masks")
        if masks is not None:  # the boxes of what the crop left of each mask: tight
            clamped = mask_boxes(masks.as_subclass(Tensor)).to(clamped.dtype)
            keep = ((clamped[:, 2] - clamped[:, 0]) >= 1) & ((clamped[:, 3] - clamped[:, 1]) >= 1)
            target["masks"] = tv_tensors.wrap(masks[keep], like=masks)
        target["boxes"] = tv_tensors.wrap(clamped[keep], like=boxes)
        target["labels"] = target["labels"][keep]
        return image, target


class NormalizeImage(v2.Transform):
    """uint8 image -> float32 ``(x / 255 - mean) / std`` in one conversion and one fused
    multiply-add (``v2.ToDtype(scale=True)`` + ``v2.Normalize`` take four passes)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float64))
        self.register_buffer("scale", scale.float().view(-1, 1, 1), persistent=False)
        shift = -torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)
        self.register_buffer("shift", shift.float().view(-1, 1, 1), persistent=False)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Normalize one image (uint8 [3, H, W] in [0, 255], or float in [0, 1])."""
        image = inpt.as_subclass(Tensor)
        scale = self.scale if image.dtype == torch.uint8 else self.scale * 255.0
        out = torch.addcmul(self.shift, image.to(torch.float32), scale)
        return tv_tensors.wrap(out, like=inpt)

    _transform = transform
