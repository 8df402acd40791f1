"""Inference on images: the predictor (model + label map + preprocessing), sliced inference for
small objects in large images, attention capture, and the CPU speed-ups (trunk graphs, the
bf16 copy)."""

from .attention import capture_attention, detect_with_attention
from .bf16 import bf16_inference_copy
from .graphs import enable_cpu_graphs, set_static_shapes, static_shapes
from .predictor import Predictor, select_detections
from .slicing import SliceSettings, merge_detections, predict_sliced, tile_windows

__all__ = [
    "Predictor",
    "SliceSettings",
    "bf16_inference_copy",
    "capture_attention",
    "detect_with_attention",
    "enable_cpu_graphs",
    "merge_detections",
    "predict_sliced",
    "select_detections",
    "set_static_shapes",
    "static_shapes",
    "tile_windows",
]
