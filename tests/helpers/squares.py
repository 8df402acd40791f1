"""A stand-in detector for the sliced-inference tests: it finds bright squares as a trained
DETR finds objects, only when they are large enough in the input it receives, and scenes of
small squares with their ground truth."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn
from torchvision.ops import box_iou

from detr_lightning.data.presets import IMAGENET_MEAN, IMAGENET_STD


class SquareDetector(nn.Module):
    """DETR's output interface over a rule: every bright blob at least ``min_side`` pixels
    wide and high in the model input is an object of class 0.

    ``forward(images)`` takes normalized images [B, 3, H, W] and returns ``pred_logits``
    [B, Q, 2] (class 0, no object) and ``pred_boxes`` [B, Q, 4] cxcywh in [0, 1]: a query per
    blob (8-connected pixels whose mean intensity exceeds one half; the box of its pixels), in
    raster order of the blobs' first pixels, with logits (shorter side / 4, 0): a score of
    sigmoid(side / 4); the other queries "no object" (logits (0, 10)).
    """

    def __init__(self, min_side: int, num_queries: int = 100) -> None:
        super().__init__()
        self.min_side, self.num_queries, self.num_classes = min_side, num_queries, 1
        self.anchor = nn.Parameter(torch.zeros(1))  # where the Predictor finds the device
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.calls: list[tuple[int, ...]] = []  # the input shape of every forward

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        self.calls.append(tuple(images.shape))
        batch, _, height, width = images.shape
        bright = (images * self.std + self.mean).mean(1) > 0.5  # [B, H, W]
        logits = torch.zeros(batch, self.num_queries, 2)
        logits[..., 1] = 10.0  # no object
        boxes = torch.full((batch, self.num_queries, 4), 0.5)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        for image, mask in enumerate(bright.cpu().numpy()):
            found = blob_boxes(mask)
            sides = found[:, 2:] - found[:, :2]
            found = found[(sides >= self.min_side).all(1)][: self.num_queries]
            count = len(found)
            x0, y0, x1, y1 = (found / scale).unbind(1)
            boxes[image, :count] = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1)
            # surer of larger blobs, as a detector is: class logit = shorter side / 4
            shorter = (found[:, 2:] - found[:, :2]).min(1).values
            logits[image, :count] = torch.stack([shorter / 4, torch.zeros(count)], 1)
        return {"pred_logits": logits, "pred_boxes": boxes}


def blob_boxes(mask: np.ndarray) -> Tensor:
    """[K, 4] xyxy pixel edges (x1, y1 exclusive) of the 8-connected blobs of a bool [H, W]
    mask, in raster order of each blob's first pixel."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    found = [(x.start, y.start, x.stop, y.stop) for y, x in ndimage.find_objects(labels)]
    return torch.tensor(found, dtype=torch.float32).reshape(-1, 4)


def square_scene(
    height: int, width: int, sides: list[int], cell: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A dark uint8 image [3, height, width] with a white square of each side in ``sides``,
    each in its own ``cell`` x ``cell`` cell of a grid (chosen at random, at a random offset
    at least 8 pixels from the cell's edges, so squares never touch); returns the image and
    the squares' boxes [N, 4] xyxy (pixel edges)."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 40, (3, height, width), generator=generator, dtype=torch.uint8)
    columns = width // cell
    cells = torch.randperm((height // cell) * columns, generator=generator)[: len(sides)]
    boxes = []
    for side, index in zip(sides, cells.tolist()):
        if side > cell - 16:
            raise ValueError(f"a square of side {side} does not fit a cell of {cell} pixels")
        dy, dx = torch.randint(8, cell - side - 8 + 1, (2,), generator=generator).tolist()
        y0, x0 = (index // columns) * cell + dy, (index % columns) * cell + dx
        image[:, y0 : y0 + side, x0 : x0 + side] = 255
        boxes.append([x0, y0, x0 + side, y0 + side])
    return image, torch.tensor(boxes, dtype=torch.float32)


def recall_and_precision(
    boxes: Tensor, scores: Tensor, truth: Tensor, iou: float = 0.5
) -> tuple[float, float]:
    """Recall and precision of detections ``boxes`` [N, 4] against ``truth`` [M, 4] (xyxy),
    each true box matched to at most one detection, greedily by score, at IoU >= ``iou``."""
    if len(boxes) == 0:
        return 0.0, 1.0
    overlaps = box_iou(boxes, truth)
    taken = torch.zeros(len(truth), dtype=torch.bool)
    matched = 0
    for index in scores.argsort(descending=True).tolist():
        candidates = overlaps[index].masked_fill(taken, -1.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            taken[best] = True
            matched += 1
    return matched / len(truth), matched / len(boxes)
