"""The results of one COCO evaluation as people read them: pycocotools' 12-line table, AP per
category, and ``metrics.json``'s content, from the scalars a run logged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .evaluator import _STAT_ROWS, max_detections, metric_keys

__all__ = [
    "format_coco_table",
    "format_per_class_table",
    "metrics_payload",
    "report",
    "result_from_metrics",
]


# ---------------------------------------------------------------------------------- reports
def format_coco_table(stats: Mapping[str, float], max_dets: int = 100) -> str:
    """The 12-line summary in pycocotools' layout."""
    dets = max_detections(max_dets)
    lines = []
    for key, title, short, iou, area, det_index in _STAT_ROWS:
        value = stats.get(key.format(dets[2]), float("nan"))
        lines.append(
            f" {title:<18} ({short}) @[ IoU={iou:<9} | area={area:>6} | "
            f"maxDets={dets[det_index]:>3} ] = {value:0.3f}"
        )
    return "\n".join(lines)


def format_per_class_table(
    per_class: Mapping[int, float], names: Mapping[int, str], columns: int = 3
) -> str:
    """AP@[.5:.95] per category, in ``columns`` columns (categories without GT are skipped)."""
    cells = [
        f"{names.get(cat, str(cat))[:20]:<20} {ap:6.3f}" for cat, ap in per_class.items() if ap >= 0
    ]
    if not cells:
        return "(no category has ground truth in the evaluated images)"
    rows = [cells[i : i + columns] for i in range(0, len(cells), columns)]
    header = " | ".join([f"{'category':<20} {'AP':>6}"] * min(columns, len(cells)))
    return "\n".join([header, "-" * len(header)] + [" | ".join(row) for row in rows])


def result_from_metrics(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The logged ``{prefix}/...`` scalars of one evaluation, without the prefix."""
    start = f"{prefix}/"
    return {k[len(start) :]: float(v) for k, v in metrics.items() if k.startswith(start)}


def _max_dets_of(metrics: Mapping[str, Any]) -> int:
    return next((int(k[4:]) for k in metrics if k.startswith("mar_") and k[4:].isdigit()
                 and k not in ("mar_1", "mar_10")), 100)  # fmt: skip


def _category_names(label_map: Mapping[str, Any] | None) -> dict[int, str]:
    if label_map is None:
        return {}
    pairs = zip(label_map["category_ids"], label_map["names"])
    return {int(cat): str(name) for cat, name in pairs if int(cat) >= 0}


def metrics_payload(
    metrics: Mapping[str, float], label_map: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The logged scalars of one evaluation (``result_from_metrics``) as ``metrics.json``
    content: the 12 statistics, ``max_dets``, image counts and ``per_class_ap`` (a list of
    category id, name and AP; -1 where the category has no ground truth)."""
    names = _category_names(label_map)
    max_dets = _max_dets_of(metrics)
    payload: dict[str, Any] = {key: metrics.get(key, float("nan")) for key in metric_keys(max_dets)}
    payload["max_dets"] = max_dets
    for key in ("num_images", "skipped_images"):
        if key in metrics:
            payload[key] = int(metrics[key])
    per_class = [
        {"category_id": int(k.split("/", 1)[1]), "ap": value}
        for k, value in metrics.items()
        if k.startswith("ap_class/")
    ]
    for entry in per_class:
        entry["name"] = names.get(entry["category_id"], str(entry["category_id"]))
    payload["per_class_ap"] = per_class
    return payload


def report(metrics: Mapping[str, float], label_map: Mapping[str, Any] | None) -> str:
    """The COCO table, the image counts and the per-class AP table of one evaluation."""
    payload = metrics_payload(metrics, label_map)
    lines = [format_coco_table(payload, payload["max_dets"])]
    if "num_images" in payload:
        lines.append(
            f"{payload['num_images']} images evaluated, "
            f"{payload.get('skipped_images', 0)} of them unreadable (counted as missed)"
        )
    if payload["per_class_ap"]:
        per_class = {e["category_id"]: e["ap"] for e in payload["per_class_ap"]}
        names = {e["category_id"]: e["name"] for e in payload["per_class_ap"]}
        lines += ["AP per category:", format_per_class_table(per_class, names)]
    return "\n".join(lines)
