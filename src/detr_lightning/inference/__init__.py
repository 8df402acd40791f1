"""Inference on images: the predictor (model + label map + preprocessing), attention capture,
and the CPU speed-ups (trunk graphs, the bf16 copy)."""

from .attention import capture_attention, detect_with_attention
from .bf16 import bf16_inference_copy
from .graphs import enable_cpu_graphs, set_static_shapes, static_shapes
from .predictor import Predictor, select_detections

__all__ = [
    "Predictor",
    "bf16_inference_copy",
    "capture_attention",
    "detect_with_attention",
    "enable_cpu_graphs",
    "select_detections",
    "set_static_shapes",
    "static_shapes",
]
