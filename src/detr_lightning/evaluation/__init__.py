"""COCO evaluation that is exact across processes, and its reports."""

from .evaluator import CocoEvaluator, EvaluationResult, coco_eval_file, metric_keys
from .report import format_coco_table, metrics_payload, report

__all__ = [
    "CocoEvaluator",
    "EvaluationResult",
    "coco_eval_file",
    "format_coco_table",
    "metric_keys",
    "metrics_payload",
    "report",
]
