"""Panoptic post-processing: the official algorithm on a batch of one (a reference written
here from its description, with PIL doing the id map's resize as there), and the same result
for an image whatever its batch."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from detr_lightning.models.panoptic_postprocess import postprocess_panoptic

NUM_CLASSES = 6  # classes 0-2 things, 3-5 stuff; index 6 = no object
IS_THING = [True, True, True, False, False, False]


def _id2rgb(ids: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*ids.shape, 3), dtype=np.uint8)
    for channel in range(3):
        rgb[..., channel] = (ids >> (8 * channel)) % 256
    return rgb


def _rgb2id(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _reference(logits, masks, size, target, threshold=0.85):
    """The official steps on one unpadded image: masks [Q, h, w] at the image's own stride."""
    probs = logits.softmax(-1)
    scores, labels = probs.max(-1)
    keep = (labels != logits.shape[-1] - 1) & (scores > threshold)
    scores, labels, masks = scores[keep], labels[keep], masks[keep]
    masks = F.interpolate(masks[:, None], size, mode="bilinear").squeeze(1)
    height, width = masks.shape[-2:]
    masks = masks.flatten(1)
    same_stuff: dict[int, list[int]] = {}
    for k, label in enumerate(labels.tolist()):
        if not IS_THING[label]:
            same_stuff.setdefault(label, []).append(k)

    def ids_and_areas(masks, count, dedup=False):
        probabilities = masks.transpose(0, 1).softmax(-1)
        if probabilities.shape[-1] == 0:
            ids = torch.zeros((height, width), dtype=torch.long)
        else:
            ids = probabilities.argmax(-1).view(height, width)
        if dedup:
            for equal in same_stuff.values():
                for k in equal:
                    ids.masked_fill_(ids.eq(k), equal[0])
        image = Image.fromarray(_id2rgb(ids.numpy()))
        image = image.resize((target[1], target[0]), resample=Image.NEAREST)
        ids = torch.from_numpy(_rgb2id(np.asarray(image)))
        return [int(ids.eq(i).sum()) for i in range(count)], ids

    areas, ids = ids_and_areas(masks, len(scores), dedup=True)
    if labels.numel() > 0:
        while True:
            small = torch.tensor([a <= 4 for a in areas], dtype=torch.bool)
            if not small.any():
                break
            scores, labels, masks = scores[~small], labels[~small], masks[~small]
            areas, ids = ids_and_areas(masks, len(scores))
    info = [
        {"id": i, "isthing": IS_THING[int(c)], "category_id": int(c), "area": a}
        for i, (c, a) in enumerate(zip(labels.tolist(), areas))
    ]
    return ids, info


def _image_outputs(generator, num_queries, mask_size):
    """One image's logits (several confident queries, stuff duplicates, a tiny segment) and
    mask logits."""
    logits = torch.randn(num_queries, NUM_CLASSES + 1, generator=generator)
    confident = torch.randperm(num_queries, generator=generator)[: num_queries // 2]
    classes = torch.tensor([0, 1, 3, 3, 4, 2, 5, 5])[: len(confident)]
    logits[confident, classes] += 12.0
    masks = torch.randn(num_queries, *mask_size, generator=generator) * 3
    masks[confident[-1]] -= 20.0  # one confident query wins (almost) no pixel: dropped
    return logits, masks


@pytest.mark.parametrize(
    "size, target",
    [((45, 61), (45, 61)), ((45, 61), (90, 122)), ((64, 48), (37, 29)), ((30, 33), (50, 41))],
)
def test_batch_of_one_is_the_official_algorithm(size, target):
    generator = torch.Generator().manual_seed(sum(size) + sum(target))
    mask_size = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    logits, masks = _image_outputs(generator, 12, mask_size)
    (result,) = postprocess_panoptic(
        {"pred_logits": logits[None], "pred_masks": masks[None]}, [size], [target],
        is_thing=IS_THING,
    )  # fmt: skip
    ids, info = _reference(logits, masks, size, target)
    assert len(info) >= 3  # the case is not trivial
    assert result.segments_info == info
    assert torch.equal(result.segment_map, ids)
    # the areas are the map's
    counts = torch.bincount(result.segment_map.flatten(), minlength=len(info))
    assert [s["area"] for s in info] == counts[: len(info)].tolist()


def test_stuff_of_one_class_becomes_one_segment():
    generator = torch.Generator().manual_seed(3)
    logits = torch.full((3, NUM_CLASSES + 1), -10.0)
    logits[:, 4] = 10.0  # three confident "stuff 4" queries
    masks = torch.randn(3, 8, 8, generator=generator)
    (result,) = postprocess_panoptic(
        {"pred_logits": logits[None], "pred_masks": masks[None]}, [(32, 32)], is_thing=IS_THING
    )
    assert result.segments_info == [{"id": 0, "isthing": False, "category_id": 4, "area": 1024}]
    assert bool((result.segment_map == 0).all())


def test_no_confident_query_gives_an_empty_segmentation():
    logits = torch.zeros(1, 5, NUM_CLASSES + 1)
    logits[..., -1] = 5.0  # everything "no object"
    (result,) = postprocess_panoptic(
        {"pred_logits": logits, "pred_masks": torch.randn(1, 5, 4, 4)}, [(16, 13)],
        [(20, 26)], is_thing=IS_THING,
    )  # fmt: skip
    assert result.segments_info == [] and result.scores == []
    assert result.segment_map.shape == (20, 26) and int(result.segment_map.abs().sum()) == 0


def test_an_image_gets_the_same_result_in_any_batch():
    """Four images padded to one canvas (masks beyond each image's region are garbage, as
    a padded batch gives) == each alone with its own masks."""
    generator = torch.Generator().manual_seed(5)
    sizes = [(64, 80), (45, 61), (30, 77), (57, 20)]
    targets = [(128, 160), (40, 50), (30, 77), (100, 35)]
    canvas = (16, 20)  # stride 4 of the padded 64 x 80 batch
    logits = torch.zeros(4, 10, NUM_CLASSES + 1)
    masks = torch.randn(4, 10, *canvas, generator=generator) * 50  # garbage outside
    alone = []
    for i, size in enumerate(sizes):
        own = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
        image_logits, image_masks = _image_outputs(generator, 10, own)
        logits[i] = image_logits
        masks[i, :, : own[0], : own[1]] = image_masks
        (result,) = postprocess_panoptic(
            {"pred_logits": image_logits[None], "pred_masks": image_masks[None]}, [size],
            [targets[i]], is_thing=IS_THING,
        )  # fmt: skip
        alone.append(result)
    batch = postprocess_panoptic(
        {"pred_logits": logits, "pred_masks": masks}, torch.tensor(sizes), torch.tensor(targets),
        is_thing=IS_THING,
    )  # fmt: skip
    for single, batched in zip(alone, batch):
        assert single.segments_info and single.segments_info == batched.segments_info
        assert torch.equal(single.segment_map, batched.segment_map)


def test_stretching_the_padded_map_would_differ():
    """What the crop prevents: upsampling a padded map to a smaller image's size (the official
    code at batch > 1) moves its segments."""
    generator = torch.Generator().manual_seed(9)
    logits, own = _image_outputs(generator, 10, (8, 8))  # a 32 x 32 image
    padded = torch.randn(10, 16, 16, generator=generator)
    padded[:, :8, :8] = own
    (cropped,) = postprocess_panoptic(
        {"pred_logits": logits[None], "pred_masks": padded[None]}, [(32, 32)], is_thing=IS_THING
    )
    stretched, _ = _reference(logits, padded, (32, 32), (32, 32))
    assert not torch.equal(cropped.segment_map, stretched)


def test_sizes_that_do_not_fit_the_masks_are_refused():
    outputs = {"pred_logits": torch.zeros(1, 2, 4), "pred_masks": torch.zeros(1, 2, 4, 4)}
    with pytest.raises(ValueError, match="needs masks of at least"):
        postprocess_panoptic(outputs, [(40, 16)], is_thing=[True, False, True])
    with pytest.raises(ValueError, match="image_sizes"):
        postprocess_panoptic(outputs, [(16, 16), (16, 16)], is_thing=[True, False, True])


def test_png_round_trip_of_the_reference_resize():
    """The reference's PIL resize of an id map keeps ids (a check of the test's own tool)."""
    ids = np.arange(12, dtype=np.int64).reshape(3, 4) * 300
    buffer = io.BytesIO()
    Image.fromarray(_id2rgb(ids)).save(buffer, format="PNG")
    back = _rgb2id(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))
    assert np.array_equal(back, ids)
