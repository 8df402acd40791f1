"""Pictures: detections drawn on their images, training samples after augmentation in a grid,
the paper's attention figures, the confusion matrix."""

from .attention_figures import attention_panels, plot_decoder_attention, plot_encoder_attention
from .augmentation_grid import augmentation_grid
from .confusion_figure import plot_confusion_matrix
from .drawing import draw_detections

__all__ = [
    "attention_panels",
    "augmentation_grid",
    "draw_detections",
    "plot_confusion_matrix",
    "plot_decoder_attention",
    "plot_encoder_attention",
]
