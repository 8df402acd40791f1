"""``detr-export`` (``python export.py``): a checkpoint as an ONNX or TorchScript graph with its
JSON sidecar (see conf/export.yaml)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ..api import load_pretrained
from ..deploy.exporters import (
    FORMATS,
    MIN_OPSET,
    ONNX_INSTALL_HINT,
    export_onnx,
    export_torchscript,
    sidecar_path,
)
from ..utils.errors import SetupError
from .config import CONFIG_PATH
from .console import exit_on_setup_error, quiet_third_party

log = logging.getLogger(__name__)

__all__ = ["export_cli"]


# ---------------------------------------------------------------------------------- CLI
def export_cli(cfg: DictConfig | Mapping[str, Any]) -> dict[str, str]:
    """Export ``cfg.ckpt_path`` (or ``cfg.pretrained``) as ``cfg.format`` (onnx or torchscript).

    Writes ``cfg.output`` (default ``<run_dir>/model.onnx`` or ``model.pt``) and its sidecar
    JSON; returns both paths. ``cfg.example_size`` (height, width) is the size of the traced
    example batch. Setup problems raise :class:`SetupError`.
    """
    source = cfg.get("ckpt_path") or cfg.get("pretrained")
    if not source:
        raise SetupError(
            "nothing to export: pass ckpt_path=PATH (a training checkpoint) or pretrained=PATH "
            "(official .pth, Hugging Face directory, or export directory)"
        )
    fmt = str(cfg.get("format") or "onnx").lower()
    if fmt not in FORMATS:
        raise SetupError(f"unknown format={cfg.get('format')!r}; choose one of {sorted(FORMATS)}")
    opset = int(cfg.get("opset") or MIN_OPSET)
    if fmt == "onnx":
        if opset < MIN_OPSET:
            raise SetupError(f"opset={opset} is too old; use opset={MIN_OPSET} or newer")
        if importlib.util.find_spec("onnx") is None:
            raise SetupError(f"format=onnx needs the onnx package: {ONNX_INSTALL_HINT}")
    output = Path(cfg.get("output") or Path(cfg.run_dir) / FORMATS[fmt]).expanduser()

    quiet_third_party()
    try:
        module = load_pretrained(source)
    except (FileNotFoundError, ValueError) as err:  # CheckpointError is a ValueError
        raise SetupError(str(err)) from err
    example_size = tuple(cfg.get("example_size") or (800, 1066))
    try:
        if fmt == "onnx":
            path = export_onnx(module, output, opset=opset, example_size=example_size)
        else:
            path = export_torchscript(module, output, example_size=example_size)
    except ValueError as err:  # example_size
        raise SetupError(str(err)) from err
    log.info("wrote %s and %s", path, sidecar_path(path))
    return {"output": str(path), "sidecar": str(sidecar_path(path))}


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    """``detr-export``"""
    exit_on_setup_error(export_cli, cfg)


if __name__ == "__main__":
    main()
