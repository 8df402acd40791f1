"""``detr-predict`` (``python predict.py``): detections for image files with a checkpoint, as
``detections.json`` and drawings in the run dir (see conf/predict.yaml)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ..api import load_pretrained
from ..inference.predictor import Predictor
from ..inference.slicing import SliceSettings
from ..tools.predict_files import image_files, predict_files
from ..utils import host_memory
from ..utils.errors import CheckpointError, SetupError
from ..viz.attention_figures import attention_panels
from .config import CONFIG_PATH
from .console import exit_on_setup_error, quiet_third_party

__all__ = ["predict_cli"]


def predict_cli(cfg) -> Path:
    """``python predict.py``: detections for ``cfg.input`` with ``cfg.pretrained`` or
    ``cfg.ckpt_path``, written into ``cfg.run_dir`` (see conf/predict.yaml).

    Returns the path of ``detections.json``; prints where the results went and how many images
    were processed and skipped. Setup problems (no or missing checkpoint, no images) raise
    SetupError.
    """
    source = cfg.get("ckpt_path") or cfg.get("pretrained")
    if not source:
        raise SetupError(
            "no model to predict with: pass pretrained=PATH (official .pth, Hugging Face "
            "directory, or export directory) or ckpt_path=PATH (a training checkpoint)"
        )
    source_path = Path(os.path.expanduser(str(source)))
    if not source_path.exists():
        key = "ckpt_path" if cfg.get("ckpt_path") else "pretrained"
        raise SetupError(f"{key}={source}: no such file or directory; check the path")
    if OmegaConf.is_missing(cfg, "input"):
        raise SetupError("nothing to predict on: pass input=IMAGE, input=FOLDER or input='*.jpg'")
    files = image_files(cfg.input)  # before loading the model: a typo fails fast
    static_shapes = _static_shapes_setting(cfg.get("static_shapes"))
    slicing = _slice_settings(cfg.get("slice"))
    # a config from before the key leaves malloc alone
    reuse = host_memory.reuse_setting(cfg.get("reuse_freed_memory", False))
    quiet_third_party()
    try:
        module = load_pretrained(source_path)
    except (CheckpointError, FileNotFoundError) as err:
        raise SetupError(str(err)) from None
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type = torch.device(device).type
    except RuntimeError as err:
        raise SetupError(f"device={device}: {err}; e.g. device=cpu or device=cuda:0") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SetupError(
            f"device={device}: no CUDA device here; use device=cpu (or leave device unset)"
        )
    if reuse and device_type == "cpu":
        host_memory.reuse_freed_memory()
    run_dir = Path(cfg.run_dir)
    json_path = predict_files(
        module.predictor(),
        files,
        run_dir,
        threshold=float(cfg.threshold),
        top_k=cfg.get("top_k"),
        batch_size=int(cfg.batch_size),
        device=device,
        bf16=bool(cfg.bf16),
        draw=bool(cfg.draw),
        static_shapes=static_shapes,
        slicing=slicing,
    )
    processed = len(json.loads(json_path.read_text()))
    skipped = len(files) - processed
    print(f"detections of {processed} image(s) in {json_path}", flush=True)
    if cfg.draw and processed:
        print(f"drawings in {run_dir / 'drawn'}", flush=True)
    if cfg.get("attention") and processed:
        panels = _attention_panels(
            module.predictor(), files, run_dir / "attention", float(cfg.threshold)
        )
        print(f"attention panels of {panels} image(s) in {run_dir / 'attention'}", flush=True)
    if skipped:
        print(f"skipped {skipped} unreadable image(s) (named in the warnings above)", flush=True)
    if files and not processed:  # a script must see that it failed
        raise SetupError(
            f"none of the {len(files)} image(s) could be read (named in the warnings above)"
        )
    return json_path


def _static_shapes_setting(value: Any) -> int | None:
    """``static_shapes`` of conf/predict.yaml: null or a number of images >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SetupError(
            f"static_shapes={value}: give the number of images that must share an input size "
            "for it to get a compiled graph (e.g. static_shapes=32), or null for none"
        )
    return value


def _slice_settings(node: Any) -> SliceSettings | None:
    """``slice`` of conf/predict.yaml as :class:`SliceSettings`; None when ``slice.size`` (or
    ``slice`` itself) is null: no slicing. A bad value raises SetupError naming its key."""
    if node is None:
        return None
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    if not isinstance(values, dict):
        raise SetupError(f"slice={node}: set its keys instead, e.g. slice.size=640")
    if values.get("size") is None:
        defaults = SliceSettings()
        for key, value in values.items():
            if key != "size" and value != getattr(defaults, key, value):
                raise SetupError(
                    f"slice.{key}={value} has no effect while slice.size is null (no slicing); "
                    "set the tile size too, e.g. slice.size=640"
                )
        return None
    try:
        return SliceSettings(**values)
    except ValueError as err:
        raise SetupError(f"slice.{err}") from None
    except TypeError as err:  # a key SliceSettings does not know
        raise SetupError(f"slice: {err}; the keys are those of conf/predict.yaml") from None


def _attention_panels(
    predictor: Predictor, files: list[Path], out_dir: Path, threshold: float
) -> int:
    """The paper's decoder and encoder attention panels of every readable file; returns how
    many images got them (unreadable ones were already reported by the prediction pass)."""
    seen: dict[str, int] = {}
    done = 0
    for path in files:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        stem = path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}"
        try:
            attention_panels(predictor, path, out_dir, threshold=threshold, stem=stem)
        except ValueError:
            continue  # does not decode: named in a warning of the prediction pass
        done += 1
    return done


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    """``detr-predict``"""
    exit_on_setup_error(predict_cli, cfg)


if __name__ == "__main__":
    main()
