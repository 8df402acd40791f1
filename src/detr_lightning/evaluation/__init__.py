"""COCO evaluation that is exact across processes, its reports, and the confusion matrix."""

from .confusion import ConfusionMatrix, confusion_from_coco
from .evaluator import CocoEvaluator, EvaluationResult, coco_eval_file, metric_keys
from .report import format_coco_table, metrics_payload, report

__all__ = [
    "CocoEvaluator",
    "ConfusionMatrix",
    "EvaluationResult",
    "coco_eval_file",
    "confusion_from_coco",
    "format_coco_table",
    "metric_keys",
    "metrics_payload",
    "report",
]
