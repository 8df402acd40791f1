"""Mapping between COCO category ids and the class labels the model predicts.

How class ids work
------------------
A COCO annotation file names its categories by ``id``; those ids need not start at 0 nor be
contiguous (COCO 2017 uses 80 categories with ids between 1 and 90). The model predicts a label
in ``0 .. num_classes - 1`` plus one extra "no object" class (index ``num_classes``), so the
dataset has to turn category ids into labels. Two conventions exist:

``"contiguous"`` (the default, right for custom datasets)
    Categories sorted by id get labels ``0 .. K-1``; ``num_classes = K``. No model slot is
    wasted, and nothing about the ids of your file matters.

``"category_id"`` (what the official DETR checkpoints use)
    The label *is* the category id and ``num_classes = max id + 1``; ids that no category uses
    become classes that never occur (named ``"N/A"``). For COCO this gives ``num_classes = 91``,
    the size of the classification head of the released weights, so choose this mode to
    evaluate or fine-tune from them without remapping the head.

Unused labels have one convention everywhere: category id ``-1`` and the name ``"N/A"``. They
come from the ``"category_id"`` mode, from the official checkpoints' 91-class head (whose
unused COCO ids are named "N/A"), and from a model with more classes than its data; their
detections are never written as results.

Either way the data module builds the ``LabelMap`` from the annotation file, reports
``num_classes`` to the model config, and the evaluation code converts predicted labels back to
category ids with :meth:`LabelMap.label_to_category`. The map is stored in checkpoints through
:meth:`LabelMap.to_dict` so predictions can be named without the annotation file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["LABEL_MAPPINGS", "UNUSED_ID", "UNUSED_NAME", "LabelMap", "padded_label_map"]

LABEL_MAPPINGS = ("contiguous", "category_id")
UNUSED_NAME = "N/A"
UNUSED_ID = -1


@dataclass
class LabelMap:
    """Which COCO category each contiguous class label ``0 .. K-1`` stands for.

    ``category_ids[label]`` is the COCO category id of ``label`` (``-1`` for the unused labels of
    the ``"category_id"`` mode) and ``names[label]`` its name. ``source`` says where the map
    came from (e.g. the annotation file), for error messages; it is not part of the map.
    """

    category_ids: list[int]
    names: list[str]
    source: str | None = field(default=None, compare=False, repr=False)
    _label_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.category_ids = [int(c) for c in self.category_ids]
        self.names = [str(n) for n in self.names]
        if len(self.category_ids) != len(self.names):
            raise ValueError(
                f"LabelMap got {len(self.category_ids)} category ids but {len(self.names)} names; "
                "pass one name per label"
            )
        self._label_of = {}
        for label, cat_id in enumerate(self.category_ids):
            if cat_id == UNUSED_ID:
                continue
            if cat_id in self._label_of:
                raise ValueError(
                    f"category id {cat_id} appears twice in the LabelMap (labels "
                    f"{self._label_of[cat_id]} and {label}); category ids must be unique"
                )
            self._label_of[cat_id] = label

    @property
    def num_classes(self) -> int:
        """Number of class labels, without the "no object" class."""
        return len(self.category_ids)

    @classmethod
    def from_coco(cls, coco: Any, mode: str = "contiguous") -> LabelMap:
        """Build the map from a pycocotools ``COCO`` object or a parsed instances JSON dict."""
        if mode not in LABEL_MAPPINGS:
            raise ValueError(
                f"unknown label mapping {mode!r}; use one of {LABEL_MAPPINGS} "
                "(see detr_lightning.data.labels for what they mean)"
            )
        categories = coco["categories"] if isinstance(coco, Mapping) else coco.dataset["categories"]
        by_id: dict[int, str] = {}
        for category in categories:
            cat_id = int(category["id"])
            if cat_id in by_id:
                raise ValueError(
                    f"category id {cat_id} is listed twice in 'categories'; "
                    "fix the annotation file so every category id is unique"
                )
            by_id[cat_id] = str(category.get("name", cat_id))
        if not by_id:
            raise ValueError("the annotation file lists no categories; add a 'categories' list")
        if mode == "contiguous":
            ids = sorted(by_id)
            return cls(category_ids=ids, names=[by_id[i] for i in ids])
        if min(by_id) < 0:
            raise ValueError(
                f"category id {min(by_id)} is negative and cannot be a label in the "
                "'category_id' mapping; use label_mapping='contiguous'"
            )
        size = max(by_id) + 1
        return cls(
            category_ids=[i if i in by_id else UNUSED_ID for i in range(size)],
            names=[by_id.get(i, UNUSED_NAME) for i in range(size)],
        )

    @classmethod
    def from_names(cls, names: Sequence[str]) -> LabelMap:
        """The map of a model whose label *is* the category id, e.g. the official COCO
        checkpoints: label i is category i, or unused where its name is "N/A" (or empty)."""
        names = [str(n) if n else UNUSED_NAME for n in names]
        return cls(
            category_ids=[UNUSED_ID if n == UNUSED_NAME else i for i, n in enumerate(names)],
            names=names,
        )

    def padded(self, num_classes: int) -> LabelMap:
        """This map extended with unused labels up to ``num_classes`` entries."""
        extra = max(num_classes - self.num_classes, 0)
        return LabelMap(
            category_ids=self.category_ids + [UNUSED_ID] * extra,
            names=self.names + [UNUSED_NAME] * extra,
            source=self.source,
        )

    def label_to_category(self, labels: Tensor | Sequence[int]) -> Tensor:
        """Map labels to COCO category ids: [N] int64 -> [N] int64 (unused labels give -1)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}], got values in "
                f"[{int(labels.min())}, {int(labels.max())}]; drop the 'no object' class first"
            )
        table = torch.tensor(self.category_ids, dtype=torch.int64, device=labels.device)
        return table[labels]

    def category_to_label(self, cat_id: int) -> int:
        """Label of one COCO category id."""
        try:
            return self._label_of[int(cat_id)]
        except KeyError:
            known = sorted(self._label_of)
            raise ValueError(
                f"category id {cat_id} is not in the label map (known ids: {known}); the "
                "annotations use a category that the 'categories' list does not declare"
            ) from None

    def to_dict(self) -> dict[str, list]:
        """Plain, JSON-able form (stored in checkpoints)."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        """Inverse of :meth:`to_dict`."""
        missing = [key for key in ("category_ids", "names") if key not in data]
        if missing:
            raise ValueError(
                f"label map dict lacks the keys {missing}; expected the output of LabelMap.to_dict"
            )
        return cls(category_ids=list(data["category_ids"]), names=list(data["names"]))


def padded_label_map(
    label_map: LabelMap | Mapping[str, Any], num_classes: int, source: object = None
) -> LabelMap:
    """``label_map`` with one entry per model label: labels past its end stand for no
    category (the "unused" convention of :mod:`detr_lightning.data.labels`).

    A map with more labels than the model is an error that names ``source`` (by default the
    map's own ``source``, e.g. the annotation file), the category ids the model cannot
    predict, and the fix."""
    if not isinstance(label_map, LabelMap):
        label_map = LabelMap.from_dict(label_map)
    source = source or label_map.source or "the label map"
    if label_map.num_classes > num_classes:
        unknown = [c for c in label_map.category_ids[num_classes:] if c >= 0]
        raise ValueError(
            f"{source} has {label_map.num_classes} classes but model.num_classes={num_classes}: "
            f"category ids {unknown} would be unknown to the model. Set "
            f"model.num_classes={label_map.num_classes} or null (= from the dataset); with "
            "pretrained=... the class head is re-initialized."
        )
    return label_map.padded(num_classes)
