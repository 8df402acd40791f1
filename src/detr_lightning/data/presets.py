"""The DETR augmentation recipes for training and validation, as ``torchvision.transforms.v2``.

Both take and return ``(image, target)``: ``image`` a uint8 ``tv_tensors.Image`` [3, H, W] in,
a float32 [3, H', W'] normalized with the ImageNet mean/std out; ``target["boxes"]`` a
``tv_tensors.BoundingBoxes`` (XYXY, absolute pixels of the current image) and
``target["labels"]`` int64 [N], kept aligned when boxes are dropped.

Training (Carion et al. 2020, section A.4): horizontal flip with probability 0.5; then, with
probability 1 - ``crop_probability``, a multi-scale resize, otherwise a resize of the short
side to one of ``crop_resize``, a random crop of ``crop_min .. crop_max`` pixels per side and
the multi-scale resize. Multi-scale resize: short side a random choice of ``scales``, long side
at most ``max_size``. Boxes cut by the crop are clamped; boxes under 1 pixel wide or high are
dropped with their labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .transforms import (
    ClampAndDropTinyBoxes,
    NormalizeImage,
    RandomSelect,
    RandomShortSideResize,
    RandomSizeCrop,
)

__all__ = [
    "DEFAULT_SCALES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectionAugmentation",
    "make_train_transforms",
    "make_val_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALES = tuple(range(480, 801, 32))


class DetectionAugmentation(v2.Compose):
    """``v2.Compose`` whose first ``num_geometric`` steps decide the output size, so that the
    size a sample will have is known before its image is decoded (:meth:`output_size`).

    Batching by output size (``data.group_by_aspect_ratio``) pads batches far less: the random
    crop and the per-image scale make shapes vary much more than the files' aspect ratios.
    """

    def __init__(
        self,
        transforms: Sequence[torch.nn.Module],
        num_geometric: int,
        source_short_side: int | None = None,
    ) -> None:
        super().__init__(list(transforms))
        self.num_geometric = num_geometric
        # The largest short side any step resizes to: a source image decoded at a reduced
        # scale that keeps at least this many pixels loses nothing the output could show.
        self.source_short_side = source_short_side
        self._geometric = v2.Compose(list(transforms)[:num_geometric])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the image that a call made now would return for a (height, width) image.

        Runs the geometric steps on a "meta" tensor (shapes only, no pixels), drawing the same
        random numbers as a real call: seed torch's generator as the real call is seeded.
        """
        image = tv_tensors.Image(torch.empty(3, height, width, dtype=torch.uint8, device="meta"))
        out = self._geometric(image)
        return int(out.shape[-2]), int(out.shape[-1])


def _normalize() -> list[v2.Transform]:
    return [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD)]


def make_train_transforms(
    *,
    scales: Sequence[int] = DEFAULT_SCALES,
    max_size: int = 1333,
    crop: bool = True,
    crop_resize: Sequence[int] = (400, 500, 600),
    crop_min: int = 384,
    crop_max: int = 600,
    crop_probability: float = 0.5,
    flip_probability: float = 0.5,
) -> DetectionAugmentation:
    """The DETR training augmentation (see the module docstring).

    ``crop=False`` (or ``crop_probability=0``) always takes the plain multi-scale branch;
    ``crop_probability=1`` always crops.
    """
    if not 0.0 <= crop_probability <= 1.0 or not 0.0 <= flip_probability <= 1.0:
        raise ValueError(
            f"crop_probability={crop_probability} and flip_probability={flip_probability} "
            "must both lie in [0, 1]"
        )
    multi_scale = RandomShortSideResize(scales, max_size=max_size)
    steps: list[torch.nn.Module] = [v2.RandomHorizontalFlip(p=flip_probability)]
    if crop and crop_probability > 0.0:
        crop_branch = v2.Compose(
            [
                RandomShortSideResize(crop_resize),
                RandomSizeCrop(crop_min, crop_max),
                RandomShortSideResize(scales, max_size=max_size),
            ]
        )
        if crop_probability >= 1.0:
            steps.append(crop_branch)
        else:
            steps.append(RandomSelect(multi_scale, crop_branch, p=crop_probability))
    else:
        steps.append(multi_scale)
    geometric = len(steps)
    steps += [ClampAndDropTinyBoxes(), *_normalize()]
    resized_to = [*scales, *(crop_resize if crop and crop_probability > 0.0 else [])]
    return DetectionAugmentation(steps, num_geometric=geometric, source_short_side=max(resized_to))


def make_val_transforms(*, val_size: int = 800, max_size: int = 1333) -> v2.Compose:
    """Deterministic evaluation transform: short side ``val_size``, long side <= ``max_size``."""
    return v2.Compose([RandomShortSideResize([val_size], max_size=max_size), *_normalize()])
