"""The detection confusion matrix: hand-computed images, the COCO-file path, the JSON, bad
inputs, and supervision's ConfusionMatrix as an independent reference (when installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from detr_lightning.evaluation.confusion import BACKGROUND, ConfusionMatrix, confusion_from_coco

NAMES = ["cat", "dog"]
CAT, DOG, BG = 0, 1, 2  # rows and columns; BG: background


def one_image(predictions, ground_truth, crowd=None, **thresholds) -> ConfusionMatrix:
    """The matrix of one image: predictions (xyxy, score, label), ground truth (xyxy, label)."""
    matrix = ConfusionMatrix(NAMES, **thresholds)
    add_image(matrix, predictions, ground_truth, crowd)
    return matrix


def add_image(matrix, predictions, ground_truth, crowd=None) -> None:
    matrix.update(
        [p[0] for p in predictions],
        [p[1] for p in predictions],
        [p[2] for p in predictions],
        [g[0] for g in ground_truth],
        [g[1] for g in ground_truth],
        crowd,
    )


def expected(*cells: tuple[int, int, int]) -> np.ndarray:
    """A 3 x 3 matrix with ``(row, column, count)`` cells, zero elsewhere."""
    counts = np.zeros((3, 3), dtype=np.int64)
    for row, column, count in cells:
        counts[row, column] = count
    return counts


BOX = [0.0, 0.0, 10.0, 10.0]


# ------------------------------------------------------------------------ one image at a time
def test_a_correct_detection_is_on_the_diagonal():
    matrix = one_image([(BOX, 0.9, CAT)], [(BOX, CAT)])
    assert matrix.counts.dtype == np.int64 and matrix.counts.shape == (3, 3)
    assert (matrix.counts == expected((CAT, CAT, 1))).all()


def test_a_box_of_the_wrong_class_is_a_confusion():
    # IoU = (9 * 10) / (100 + 100 - 90) = 0.818
    matrix = one_image([([1.0, 0, 11, 10], 0.8, DOG)], [(BOX, CAT)])
    assert (matrix.counts == expected((CAT, DOG, 1))).all()  # true cat, predicted dog


def test_unmatched_ground_truth_is_missed_and_unmatched_prediction_a_false_positive():
    # IoU = (5 * 10) / (100 + 100 - 50) = 1/3 < 0.5: no match
    matrix = one_image([([5.0, 0, 15, 10], 0.9, CAT)], [(BOX, DOG)])
    assert (matrix.counts == expected((DOG, BG, 1), (BG, CAT, 1))).all()
    # the same pair matches at a lower IoU threshold, as a confusion
    matrix = one_image([([5.0, 0, 15, 10], 0.9, CAT)], [(BOX, DOG)], iou_threshold=0.3)
    assert (matrix.counts == expected((DOG, CAT, 1))).all()


def test_the_iou_threshold_is_inclusive():
    # IoU = (10 * 10) / (10 * 20) = 0.5 exactly
    matrix = one_image([([0.0, 0, 10, 20], 0.9, CAT)], [(BOX, CAT)])
    assert (matrix.counts == expected((CAT, CAT, 1))).all()


def test_predictions_below_the_score_threshold_do_not_exist():
    matrix = one_image([(BOX, 0.49, CAT)], [(BOX, CAT)])
    assert (matrix.counts == expected((CAT, BG, 1))).all()  # the cat is missed, no FP
    matrix = one_image([(BOX, 0.5, CAT)], [(BOX, CAT)])  # inclusive
    assert (matrix.counts == expected((CAT, CAT, 1))).all()
    matrix = one_image([(BOX, 0.49, CAT)], [(BOX, CAT)], score_threshold=0.3)
    assert (matrix.counts == expected((CAT, CAT, 1))).all()


def test_two_predictions_on_one_object_give_one_match_and_one_false_positive():
    # both cats: the one with the higher IoU (1.0 against 0.9) matches, the other is a FP
    matrix = one_image([([0.0, 0, 10, 9], 0.95, CAT), (BOX, 0.6, CAT)], [(BOX, CAT)])
    assert (matrix.counts == expected((CAT, CAT, 1), (BG, CAT, 1))).all()
    # a dog at IoU 1.0 and a cat at IoU 0.9 on a cat: the same-class pair is taken first
    matrix = one_image([(BOX, 0.95, DOG), ([0.0, 0, 10, 9], 0.6, CAT)], [(BOX, CAT)])
    assert (matrix.counts == expected((CAT, CAT, 1), (BG, DOG, 1))).all()
    # identical boxes of one class: the higher score takes the object (the FP is the same)
    matrix = one_image([(BOX, 0.6, DOG), (BOX, 0.9, CAT)], [(BOX, DOG)])
    assert (matrix.counts == expected((DOG, DOG, 1), (BG, CAT, 1))).all()


def test_pairs_are_taken_by_overlap_not_by_score():
    """Cat A [0,0,10,10] and cat B [4,0,14,10]. The 0.9 prediction [1,0,11,10] overlaps A at
    IoU 90/110 = 0.818 and B at 70/130 = 0.538; the 0.6 prediction [0,0,10,10] is A itself
    (IoU 1.0) and overlaps B at 60/140 = 0.43. Taking the best pairs first matches both
    objects; COCOeval's score order would give A to the 0.9 prediction and miss B."""
    predictions = [([1.0, 0, 11, 10], 0.9, CAT), (BOX, 0.6, CAT)]
    matrix = one_image(predictions, [(BOX, CAT), ([4.0, 0, 14, 10], CAT)])
    assert (matrix.counts == expected((CAT, CAT, 2))).all()


def test_crowd_regions_are_never_missed_and_absorb_the_predictions_inside():
    crowd_region = ([0.0, 0, 100, 100], CAT)
    # a dog inside the region (all of its area), another dog 10 x 10 of 30 x 30 inside (1/9)
    inside, overlapping = ([10.0, 10, 30, 30], 0.9, DOG), ([90.0, 90, 120, 120], 0.8, DOG)
    matrix = one_image([inside, overlapping], [crowd_region], crowd=[True])
    assert (matrix.counts == expected((BG, DOG, 1))).all()  # only the overlapping one is a FP
    assert matrix.num_crowd_ignored == 1
    # an object inside the region is matched first: the crowd takes only what is left
    cat = ([10.0, 10, 30, 30], CAT)
    second = ([11.0, 10, 31, 30], 0.7, CAT)
    matrix = one_image([inside, second], [crowd_region, cat], crowd=[True, False])
    assert (matrix.counts == expected((CAT, CAT, 1))).all()
    assert matrix.num_crowd_ignored == 1
    # a crowd region without predictions: nothing at all
    matrix = one_image([], [crowd_region], crowd=[True])
    assert matrix.counts.sum() == 0 and matrix.num_images == 1


def test_images_without_ground_truth_or_without_predictions():
    no_ground_truth = one_image([(BOX, 0.9, CAT), ([20.0, 20, 30, 30], 0.7, DOG)], [])
    assert (no_ground_truth.counts == expected((BG, CAT, 1), (BG, DOG, 1))).all()
    no_predictions = one_image([], [(BOX, CAT), ([20.0, 20, 30, 30], CAT)])
    assert (no_predictions.counts == expected((CAT, BG, 2))).all()
    empty = one_image([], [])
    assert empty.counts.sum() == 0 and empty.num_images == 1


def test_tensors_of_a_model_are_accepted():
    matrix = ConfusionMatrix(NAMES)
    matrix.update(
        torch.tensor([BOX], dtype=torch.float32),
        torch.tensor([0.8]),
        torch.tensor([DOG]),
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64),
    )
    assert (matrix.counts == expected((BG, DOG, 1))).all()


# ----------------------------------------------------------------- accumulated, normalized, JSON
def accumulated() -> ConfusionMatrix:
    """Four images: a correct cat and a cat seen as a dog; a missed dog; a FP cat and a
    low-score dog; two cats on one cat."""
    matrix = ConfusionMatrix(NAMES)
    far = [50.0, 50, 60, 60]
    add_image(matrix, [(BOX, 0.9, CAT), (far, 0.8, DOG)], [(BOX, CAT), (far, CAT)])
    add_image(matrix, [], [(BOX, DOG)])
    add_image(matrix, [(BOX, 0.7, CAT), (far, 0.2, DOG)], [])
    add_image(matrix, [(BOX, 0.9, CAT), ([0.0, 0, 10, 9], 0.8, CAT)], [(BOX, CAT)])
    return matrix


def test_counts_accumulate_and_rows_normalize():
    matrix = accumulated()
    #          predicted: cat dog background
    counts = [
        [2, 1, 0],  # 3 cats: 2 found, 1 seen as a dog
        [0, 0, 1],  # 1 dog, missed
        [2, 0, 0],
    ]  # 2 false positives, both cats
    assert matrix.counts.tolist() == counts and matrix.num_images == 4  # fmt: skip
    normalized = matrix.normalized()
    assert normalized.dtype == np.float64
    np.testing.assert_allclose(normalized, [[2 / 3, 1 / 3, 0], [0, 0, 1], [1, 0, 0]])
    # a class without objects keeps a zero row
    assert ConfusionMatrix(NAMES).normalized().tolist() == [[0.0] * 3] * 3


def test_json_holds_names_thresholds_counts_and_normalized_rows(tmp_path):
    matrix = accumulated()
    path = matrix.write_json(tmp_path / "out" / "confusion_matrix.json")
    assert path == tmp_path / "out" / "confusion_matrix.json"
    written = json.loads(path.read_text())
    assert written["class_names"] == ["cat", "dog", BACKGROUND] and BACKGROUND == "background"
    assert written["category_ids"] is None
    assert (written["score_threshold"], written["iou_threshold"]) == (0.5, 0.5)
    assert written["counts"] == [[2, 1, 0], [0, 0, 1], [2, 0, 0]]
    np.testing.assert_allclose(written["normalized"], [[2 / 3, 1 / 3, 0], [0, 0, 1], [1, 0, 0]])
    assert written["num_images"] == 4
    assert written["num_ground_truth"] == 4  # 3 cats, 1 dog
    assert written["num_predictions"] == 5  # above the threshold: 4 cats, 1 dog
    assert written["num_crowd_ignored_predictions"] == 0
    assert "true class i (row)" in written["layout"]
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left


# ------------------------------------------------------------------------ from COCO files
def test_from_coco_files_uses_category_ids_crowd_and_the_evaluated_images():
    ground_truth = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],  # ids unsorted
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0, 0, 100, 100], "iscrowd": 1},
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [5, 5, 20, 20], "iscrowd": 0},
            {"id": 13, "image_id": 3, "category_id": 3, "bbox": [0, 0, 10, 10]},
        ],
    }
    results = [
        # image 1: the cat found as a dog; a cat inside the crowd region; a low-score dog
        # outside it
        {"image_id": 1, "category_id": 7, "bbox": [0.5, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [40, 40, 10, 10], "score": 0.8},
        {"image_id": 1, "category_id": 7, "bbox": [150, 150, 10, 10], "score": 0.1},
        # image 2 has no result: its dog is missed. A category the file does not have:
        {"image_id": 2, "category_id": 99, "bbox": [5, 5, 20, 20], "score": 0.9},
        # image 3 is not evaluated: neither its cat nor this result counts
        {"image_id": 3, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.9},
    ]
    matrix = confusion_from_coco(ground_truth, results, image_ids=[1, 2])
    assert matrix.class_names == ["cat", "dog"] and matrix.category_ids == [3, 7]
    # IoU of [0.5, 0, 10.5, 10] with [0, 0, 10, 10]: 95 / 105 = 0.905
    assert matrix.counts.tolist() == [[0, 1, 0], [0, 0, 1], [0, 0, 0]]
    assert matrix.num_images == 2 and matrix.num_crowd_ignored == 1
    assert matrix.to_dict()["category_ids"] == [3, 7, None]
    # every image of the file by default; image 3's cat is then found
    everything = confusion_from_coco(ground_truth, results, score_threshold=0.05)
    assert everything.counts.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    assert everything.num_images == 3


def test_from_coco_files_names_an_undeclared_category():
    ground_truth = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "cat"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}],
    }
    with pytest.raises(ValueError, match=r"annotation 5 has category_id 2.*\[1\]"):
        confusion_from_coco(ground_truth, [])


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"score_threshold must lie in \[0, 1\], got 1.5"):
        ConfusionMatrix(NAMES, score_threshold=1.5)
    with pytest.raises(ValueError, match=r"iou_threshold must lie in \(0, 1\], got 0"):
        ConfusionMatrix(NAMES, iou_threshold=0)
    with pytest.raises(ValueError, match="one category id per class"):
        ConfusionMatrix(NAMES, category_ids=[1])
    matrix = ConfusionMatrix(NAMES)
    with pytest.raises(ValueError, match=r"pred_labels must lie in \[0, 1\].*\[2, 2\]"):
        add_image(matrix, [(BOX, 0.9, 2)], [])
    with pytest.raises(ValueError, match=r"gt_boxes must have shape \[N, 4\], got \(1, 3\)"):
        matrix.update([], [], [], [[0.0, 0, 1]], [0])
    with pytest.raises(ValueError, match=r"pred_scores must have shape \[1\], got \(2,\)"):
        matrix.update([BOX], [0.5, 0.6], [0], [], [])
    assert matrix.counts.sum() == 0 and matrix.num_images == 0  # nothing half-counted


# ------------------------------------------------------- supervision as independent reference
def random_scene(generator: torch.Generator, num_classes: int):
    """Crowded boxes in a 60 x 60 image, predictions jittered around the objects (so that
    pairs compete), some of another class, plus random false positives."""
    num_objects = int(torch.randint(0, 7, (1,), generator=generator))
    corner = torch.rand(num_objects, 2, generator=generator) * 40
    gt_boxes = torch.cat(
        [corner, corner + 8 + torch.rand(num_objects, 2, generator=generator) * 12], 1
    )
    gt_labels = torch.randint(num_classes, (num_objects,), generator=generator)
    copies = gt_boxes.repeat(2, 1) + torch.randn(2 * num_objects, 4, generator=generator) * 2
    copy_labels = gt_labels.repeat(2)
    swap = torch.rand(2 * num_objects, generator=generator) < 0.3
    copy_labels[swap] = torch.randint(num_classes, (int(swap.sum()),), generator=generator)
    num_random = int(torch.randint(0, 4, (1,), generator=generator))
    corner = torch.rand(num_random, 2, generator=generator) * 40
    random_boxes = torch.cat(
        [corner, corner + 5 + torch.rand(num_random, 2, generator=generator) * 15], 1
    )
    pred_boxes = torch.cat([copies, random_boxes])
    pred_boxes[:, 2:] = torch.maximum(pred_boxes[:, 2:], pred_boxes[:, :2] + 1)
    pred_labels = torch.cat(
        [copy_labels, torch.randint(num_classes, (num_random,), generator=generator)]
    )
    pred_scores = torch.rand(len(pred_boxes), generator=generator, dtype=torch.float64)
    return pred_boxes.double(), pred_scores, pred_labels, gt_boxes.double(), gt_labels


def test_random_scenes_agree_with_supervision():
    """supervision's matrix has the same layout and matching (IoU strictly above the
    threshold there: continuous random boxes never sit on it). Crowd regions are ours alone."""
    sv = pytest.importorskip("supervision")
    generator = torch.Generator().manual_seed(0)
    classes = ["a", "b", "c"]
    for score_threshold, iou_threshold in ((0.5, 0.5), (0.3, 0.4), (0.0, 0.7)):
        ours = ConfusionMatrix(
            classes, score_threshold=score_threshold, iou_threshold=iou_threshold
        )
        predictions, targets = [], []
        for _ in range(200):
            pred_boxes, scores, pred_labels, gt_boxes, gt_labels = random_scene(generator, 3)
            ours.update(pred_boxes, scores, pred_labels, gt_boxes, gt_labels)
            predictions.append(
                torch.cat([pred_boxes, pred_labels[:, None], scores[:, None]], 1).numpy()
            )
            targets.append(torch.cat([gt_boxes, gt_labels[:, None].double()], 1).numpy())
        reference = sv.ConfusionMatrix.from_tensors(
            predictions=predictions, targets=targets, classes=classes,
            conf_threshold=score_threshold, iou_threshold=iou_threshold,
        ).matrix  # fmt: skip
        assert ours.counts.tolist() == reference.tolist(), (score_threshold, iou_threshold)
        # the scenes hold every kind of cell
        assert (np.diag(ours.counts)[:3] > 0).all() and ours.counts[:3, :3].sum() > np.trace(
            ours.counts
        )
        assert ours.counts[:3, 3].sum() > 0 and ours.counts[3, :3].sum() > 0


def test_random_scenes_count_every_object_and_every_kept_prediction():
    """Always run: row sums are the objects of each class, column sums the predictions of
    each class above the score threshold."""
    generator = torch.Generator().manual_seed(1)
    matrix = ConfusionMatrix(["a", "b", "c"], score_threshold=0.4, iou_threshold=0.5)
    objects, kept = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    for _ in range(100):
        pred_boxes, scores, pred_labels, gt_boxes, gt_labels = random_scene(generator, 3)
        matrix.update(pred_boxes, scores, pred_labels, gt_boxes, gt_labels)
        objects += np.bincount(gt_labels.numpy(), minlength=3)
        kept += np.bincount(pred_labels[scores >= 0.4].numpy(), minlength=3)
    assert matrix.counts[:3].sum(1).tolist() == objects.tolist()
    assert matrix.counts[:, :3].sum(0).tolist() == kept.tolist()
    assert matrix.counts[3, 3] == 0 and np.trace(matrix.counts) > 0
