"""The library's entry points for weights: :func:`load_pretrained` builds a ready
:class:`~detr_lightning.lightning.DETRModule` from any supported checkpoint (official,
Hugging Face, our own), :func:`save_pretrained` writes one as ``model.safetensors`` +
``config.json``. Deployment graphs (ONNX, TorchScript) are :mod:`detr_lightning.deploy`'s.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from .checkpoints.loading import load_state_into
from .checkpoints.reading import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    WEIGHTS_FILE,
    read_checkpoint,
)
from .lightning.module import DETRModule
from .lightning.specs import plain
from .models.training_queries import TRAINING_ONLY_PREFIX, without_training_queries
from .utils.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["export", "load_pretrained", "save_pretrained"]


def load_pretrained(
    path: str | os.PathLike,
    dilation: bool | None = None,
    num_classes: int | None = None,
) -> DETRModule:
    """Build a :class:`~detr_lightning.lightning.DETRModule` from a checkpoint, in eval mode.

    Args:
        path: official ``.pth``, Hugging Face directory/file, our ``.ckpt`` or export directory.
        dilation: force DC5 on/off (default: from the checkpoint's config or file name).
        num_classes: when different from the checkpoint's, the class head is re-initialized for
            fine-tuning (logged); the rest must match exactly.
    """
    info = read_checkpoint(path)
    model_cfg = dict(info["model"])
    if dilation is not None:
        model_cfg["backbone"] = {**model_cfg["backbone"], "dilation": bool(dilation)}
    label_map = info["label_map"]
    reinit = num_classes is not None and num_classes != model_cfg["num_classes"]
    if reinit:
        log.info(
            "%s: re-initializing the class head for %d classes (checkpoint has %d); all other "
            "weights are loaded",
            info["path"],
            num_classes,
            model_cfg["num_classes"],
        )
        model_cfg["num_classes"] = num_classes
        label_map = None
    hparams = dict(info["hparams"] or {})
    hparams["model"] = model_cfg
    hparams["label_map"] = label_map
    module = DETRModule(**hparams)
    load_state_into(module.model, info["state_dict"], info["path"], reinit_class_head=reinit)
    return module.eval()


def save_pretrained(module: DETRModule, path: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into directory ``path`` (atomically).

    The directory loads back with :func:`load_pretrained`; the config holds every module
    setting (model, loss, post-processing, label map).
    """
    from safetensors.torch import save_file

    directory = Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    # the model that evaluation runs: training-only queries are left out, weights and settings
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in module.model.state_dict().items()
        if not k.startswith(TRAINING_ONLY_PREFIX)
    }
    hparams = plain(dict(module.hparams))
    hparams["model"] = without_training_queries(hparams["model"])
    config = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "hparams": hparams}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    atomic_write(
        directory / CONFIG_FILE,
        lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True)),
    )
    return directory


def export(module: DETRModule, path: str | os.PathLike) -> Path:
    """Deprecated name of :func:`save_pretrained` (``export`` now means the deployment graphs
    of ``detr-export``)."""
    warnings.warn(
        "detr_lightning.export is deprecated: use detr_lightning.save_pretrained",
        DeprecationWarning,
        stacklevel=2,
    )
    return save_pretrained(module, path)
