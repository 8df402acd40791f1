"""Detections on your own images: a :class:`Predictor` holds a DETR, its label map and the
preprocessing it was evaluated with, and turns images into scored, named boxes.

Images go through the evaluation preprocessing
(:func:`~detr_lightning.data.images.inference_transform`) and come back with boxes in the
pixels of the original image (after EXIF orientation). The selection follows the official
DETR demo: softmax over the classes, "no object" dropped, the best class of each query, kept
when its probability exceeds ``threshold``. ``DETRModule.predict`` and
:func:`~detr_lightning.tools.predict_files.predict_files` run through it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..data.images import inference_transform, read_image
from ..data.labels import LabelMap
from ..models.detr import DETR
from ..ops.boxes import box_cxcywh_to_xyxy
from .bf16 import bf16_inference_copy

log = logging.getLogger(__name__)

__all__ = ["DecodedImage", "ImageSource", "Predictor", "decoded_images", "select_detections"]

ImageSource = str | os.PathLike | Image.Image | Tensor


def decoded_images(
    sources: Iterable[ImageSource], skip_unreadable: bool = False
) -> Iterator[tuple[int, Tensor]]:
    """``(index, uint8 pixels [3, H, W])`` of each source, in order, decoded one at a time;
    with ``skip_unreadable`` a source that does not decode is named in a warning and left
    out, else its error raises."""
    for index, source in enumerate(sources):
        try:
            pixels = read_image(source)
        except (OSError, ValueError) as err:
            if not skip_unreadable:
                raise
            log.warning("skipped %s: %s", source, err)
            continue
        yield index, pixels


@dataclass
class DecodedImage:
    """One decoded image on its way through :meth:`Predictor.iter_predictions`."""

    index: int  # position among the sources
    size: tuple[int, int]  # original (height, width)
    model_input: Tensor  # normalized float [3, H', W']
    pixels: Tensor | None  # uint8 [3, H, W], kept only when the caller draws


class Predictor:
    """A DETR with what inference needs around it.

    Args:
        model: the detector (its weights are used as they are; see :meth:`iter_predictions`
            for its mode and device).
        label_map: category ids and names of the model's labels (a :class:`LabelMap` or its
            ``to_dict()`` form); labels past its end, and all labels without one, stand for no
            dataset category (None: ``class_<i>`` names, category id = label).
        preprocessing: the data settings the model was evaluated with (``val_size``,
            ``max_size``; a checkpoint's ``hparams["data"]``); None: the paper's 800 / 1333.
    """

    def __init__(
        self,
        model: DETR,
        label_map: LabelMap | Mapping[str, Any] | None = None,
        preprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        num_classes = model.num_classes
        if label_map is None:
            self.category_ids = list(range(num_classes))
            self.names = [f"class_{i}" for i in range(num_classes)]
        else:
            if not isinstance(label_map, LabelMap):
                label_map = LabelMap.from_dict(label_map)
            padded = label_map.padded(num_classes)
            self.category_ids, self.names = list(padded.category_ids), list(padded.names)
        self.preprocessing = dict(preprocessing) if preprocessing else None
        self.transform = inference_transform(self.preprocessing)

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        *,
        threshold: float = 0.7,
        top_k: int | None = None,
        batch_size: int = 1,
        device: str | torch.device | None = None,
        bf16: bool = False,
    ) -> list[dict[str, Any]]:
        """Detect objects in one image or a list of images.

        An image is a file path, a PIL image, a uint8 tensor [3, H, W] (or [H, W], [1/4, H, W])
        or a float tensor in [0, 1]; a [B, 3, H, W] tensor is B images. Float tensors are
        quantized to 8 bits like a file, so every kind of input gives the same detections.

        Returns, per image in order, a dict of CPU tensors sorted by score (descending):
        ``scores`` float32 [N], ``labels`` int64 [N] (contiguous), ``names`` (N strings),
        ``category_ids`` int64 [N] (dataset ids), ``boxes`` float32 [N, 4] xyxy in original
        image pixels (not clamped to the image, as in evaluation), ``queries`` int64 [N] (the
        decoder query of each detection). Labels whose category id is -1 (unused) are never
        returned. ``device`` None keeps the model where it is; otherwise the model is moved
        there. ``bf16`` runs the forward under bfloat16 autocast.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        elif isinstance(images, Tensor):
            images = list(images) if images.dim() == 4 else [images]
        images = list(images)
        results: dict[int, dict[str, Any]] = {}
        for image, detection in self.iter_predictions(
            images,
            threshold=threshold,
            top_k=top_k,
            batch_size=batch_size,
            device=device,
            bf16=bf16,
        ):
            results[image.index] = detection
        return [results[i] for i in range(len(images))]

    def iter_predictions(
        self,
        sources: Iterable[ImageSource],
        *,
        threshold: float = 0.7,
        top_k: int | None = None,
        batch_size: int = 1,
        device: str | torch.device | None = None,
        bf16: bool = False,
        keep_pixels: bool = False,
        skip_unreadable: bool = False,
    ) -> Iterator[tuple[DecodedImage, dict[str, Any]]]:
        """Yield ``(image, detection)`` per source as its batch completes (not in input order).

        ``detection`` is as in :meth:`predict`; ``image`` a :class:`DecodedImage` (its
        ``index`` in ``sources``, original ``size``, and ``pixels`` only with
        ``keep_pixels``). With ``skip_unreadable`` a source that does not decode is logged as
        a warning and left out, otherwise its error propagates. At most ``2 * batch_size``
        decoded images are held at once. The model runs in eval mode and is put back in its
        mode afterwards.
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive number of detections or None, got {top_k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        model = self.model
        if device is not None:
            model.to(device)
        was_training = model.training
        model.eval()
        run = _BatchRunner(self, threshold, top_k, bf16)
        # DETR's outputs depend on the padding a batch adds: the backbone's receptive fields
        # at the right and bottom edges take in the padded zeros, and the mask downsampled to
        # the feature grid rounds each image's extent, which the position encoding is
        # normalized by. So images share a batch only with others of identical preprocessed
        # size (no padding at all), and a batch gives the detections of one-by-one inference;
        # each size waits in its own bucket.
        buckets: dict[tuple[int, int], list[DecodedImage]] = {}
        pending_limit = 2 * batch_size
        try:
            for index, pixels in decoded_images(sources, skip_unreadable):
                model_input = self.transform(pixels)
                size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
                item = DecodedImage(index, size, model_input, pixels if keep_pixels else None)
                bucket = buckets.setdefault(tuple(model_input.shape[-2:]), [])
                bucket.append(item)
                if len(bucket) >= batch_size:
                    yield from run(buckets.pop(tuple(model_input.shape[-2:])))
                elif sum(map(len, buckets.values())) >= pending_limit:
                    # bounded memory: the largest bucket goes even though it is not full
                    largest = max(buckets, key=lambda key: len(buckets[key]))
                    yield from run(buckets.pop(largest))
            for key in list(buckets):
                yield from run(buckets.pop(key))
        finally:
            model.train(was_training)

    def select(
        self,
        logits: Tensor,
        pred_boxes: Tensor,
        size: tuple[int, int],
        *,
        threshold: float,
        top_k: int | None = None,
    ) -> dict[str, Any]:
        """One image's detections (:func:`select_detections` with this model's labels)."""
        return select_detections(
            logits,
            pred_boxes,
            size,
            threshold=threshold,
            top_k=top_k,
            category_ids=torch.as_tensor(self.category_ids, dtype=torch.int64),
            names=self.names,
        )


class _BatchRunner:
    """Forward one batch of same-size images and select the detections of each."""

    def __init__(self, predictor: Predictor, threshold: float, top_k: int | None, bf16: bool):
        self.predictor = predictor
        self.threshold = threshold
        self.top_k = top_k
        self.bf16 = bf16
        self.model = predictor.model
        self.batches = 0
        self.category_table = torch.as_tensor(predictor.category_ids, dtype=torch.int64)
        self.device = next(predictor.model.parameters()).device

    @torch.no_grad()  # not inference_mode: callers may edit the returned tensors in place
    def __call__(self, items: list[DecodedImage]) -> Iterator[tuple[DecodedImage, dict]]:
        batch = torch.stack([item.model_input for item in items]).to(self.device)
        if self.bf16 and self.batches == 1:
            # From the second batch on, a copy with the backbone's weights folded and cast
            # once, not at every call; the same detections (see bf16_inference_copy). A call
            # with one batch does not pay for the copy.
            self.model = bf16_inference_copy(self.predictor.model)
        self.batches += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.model(batch)
        logits = outputs["pred_logits"].float().cpu()  # [B, Q, C + 1]
        pred_boxes = outputs["pred_boxes"].float().cpu()  # [B, Q, 4] cxcywh in [0, 1]
        for item, image_logits, image_boxes in zip(items, logits, pred_boxes):
            yield (
                item,
                select_detections(
                    image_logits,
                    image_boxes,
                    item.size,
                    threshold=self.threshold,
                    top_k=self.top_k,
                    category_ids=self.category_table,
                    names=self.predictor.names,
                ),
            )


def select_detections(
    logits: Tensor,
    pred_boxes: Tensor,
    size: tuple[int, int],
    *,
    threshold: float,
    category_ids: Tensor,
    names: Sequence[str],
    top_k: int | None = None,
) -> dict[str, Any]:
    """One image's detections, selected as the official demo does.

    ``logits`` [Q, C + 1] and ``pred_boxes`` [Q, 4] (cxcywh in [0, 1]) of one image; ``size``
    its original (height, width); ``category_ids`` [C] the dataset id of each label (-1:
    unused, never kept). Softmax, "no object" dropped, best class per query, kept when its
    probability > ``threshold``; sorted by score, at most ``top_k``. Returns the dict that
    :meth:`Predictor.predict` documents.
    """
    scores, labels = logits.softmax(-1)[:, :-1].max(-1)
    category_ids = category_ids.to(labels.device)
    keep = (scores > threshold) & (category_ids[labels] != -1)
    queries = keep.nonzero().flatten()
    order = scores[queries].argsort(descending=True, stable=True)[:top_k]
    queries = queries[order]
    labels = labels[queries]
    height, width = size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return {
        "scores": scores[queries],
        "labels": labels,
        "names": [names[i] for i in labels.tolist()],
        "category_ids": category_ids[labels],
        "boxes": box_cxcywh_to_xyxy(pred_boxes[queries]) * scale.to(pred_boxes.device),
        "queries": queries,
    }
