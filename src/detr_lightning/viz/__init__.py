"""Pictures: detections drawn on their images, the paper's attention figures."""

from .attention_figures import attention_panels, plot_decoder_attention, plot_encoder_attention
from .drawing import draw_detections

__all__ = [
    "attention_panels",
    "draw_detections",
    "plot_decoder_attention",
    "plot_encoder_attention",
]
