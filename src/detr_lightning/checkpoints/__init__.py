"""Checkpoint files: safe reading (weights only), the official and Hugging Face layouts
converted to ours, the architecture read off the weights, and the files of a training run."""

from .loading import load_state_into
from .reading import needs_config_file, read_checkpoint

__all__ = ["load_state_into", "needs_config_file", "read_checkpoint"]
