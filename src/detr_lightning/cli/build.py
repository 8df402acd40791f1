"""The module and data of a training config: the model settings, the data module, ImageNet
weights fetched before any data work, and a ``pretrained=`` checkpoint checked against the
config's architecture before anything is built."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from ..checkpoints.loading import load_state_into
from ..checkpoints.reading import read_checkpoint
from ..data.labels import padded_label_map
from ..lightning.module import DETRModule
from ..lightning.specs import plain
from ..models.backbone_weights import ensure_imagenet_weights
from ..utils.errors import CheckpointError, SetupError, reported_as_setup_error

__all__ = [
    "build_module",
    "check_architecture",
    "data_setting",
    "ensure_backbone_weights",
    "instantiate_data",
]

log = logging.getLogger(__name__)


def instantiate_data(node: DictConfig) -> Any:
    """Instantiate the data module; its own errors (missing files, bad annotations) surface as
    they are instead of wrapped in Hydra's InstantiationException."""
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        if err.__cause__ is not None and not isinstance(err.__cause__, TypeError):
            raise err.__cause__ from None
        raise


def data_setting(data: Any) -> str:
    """How a data error names the user's dataset: ``data.root=<root>``, or ``data`` (the
    synthetic set, or paths given one by one)."""
    root = data.get("root") if hasattr(data, "get") else None
    return f"data.root={root}" if root else "data"


def ensure_backbone_weights(cfg: DictConfig) -> None:
    """Fetch (or find in the cache) the ImageNet weights the config asks for, before any data
    work, so an offline node fails at once with one message (SetupError)."""
    backbone = cfg.backbone
    if backbone.weights and not cfg.get("pretrained"):
        if not Path(str(backbone.weights)).expanduser().is_file():
            raise SetupError(
                f"backbone.weights={backbone.weights}: no such file; give a torchvision ResNet "
                "state-dict file, or backbone.weights=null to use backbone.pretrained"
            )
    elif backbone.pretrained and not cfg.get("pretrained"):
        ensure_imagenet_weights(backbone.name)


def build_module(cfg: DictConfig, datamodule: Any) -> DETRModule:
    """The DETRModule of a training config, initialized from ``cfg.pretrained`` if set.

    The ``model``, ``loss``, ``optimizer``, ``schedule`` and ``postprocess`` groups go to the
    module as they are (their keys are the constructors' arguments); the label map (which
    also gives ``model.num_classes: null`` its value) and the evaluation settings come from
    ``datamodule``. With ``pretrained``, the class head is re-initialized when the
    checkpoint's labels differ from the data's (count, category ids or names).
    """
    model = plain(cfg.model)
    info = None
    if cfg.get("pretrained"):  # read and checked before the model is built
        with reported_as_setup_error(
            f"pretrained={cfg.pretrained}", CheckpointError, FileNotFoundError
        ):
            info = read_checkpoint(cfg.pretrained)
        check_architecture(info, model)
        if model["backbone"].get("pretrained"):
            log.info("pretrained=%s given: not loading ImageNet backbone weights", cfg.pretrained)
        model["backbone"].update(pretrained=False, weights=None)
    module = DETRModule(
        model=model,
        loss=plain(cfg.loss),
        optimizer=plain(cfg.optimizer),
        schedule=plain(cfg.schedule),
        postprocess=plain(cfg.postprocess),
        label_map=datamodule.label_map,
        data=datamodule.evaluation_settings(),
        eval_backend=cfg.eval_backend,
    )
    if info is not None:
        reinit = _class_head_differs(info, module)
        with reported_as_setup_error(f"pretrained={cfg.pretrained}", CheckpointError):
            load_state_into(
                module.model, info["state_dict"], info["path"], reinit_class_head=reinit
            )
        log.info("initialized from %s (%s format)", cfg.pretrained, info["format"])
    return module


# model settings that a checkpoint's weights fix (a path into the ``model`` spec), and the
# override that sets each
ARCHITECTURE_OVERRIDES = {
    ("backbone", "name"): "backbone",  # a config of the backbone group, e.g. backbone=resnet101
    ("backbone", "num_stages"): "backbone.num_stages",
    # no trace in the shapes, compared when the checkpoint records it (our own files): a
    # frozen-BN model finds BatchNorm's step counters in a norm=batch file, and no running
    # statistics in a norm=group one
    ("backbone", "norm"): "backbone.norm",
    ("hidden_dim",): "model.hidden_dim",
    # no trace either (our files, Hugging Face's config, the official ``args`` record it):
    # the same tensors split into 4 heads or into 8 are two different models
    ("nheads",): "model.nheads",
    ("num_queries",): "model.num_queries",
    ("enc_layers",): "model.enc_layers",
    ("dec_layers",): "model.dec_layers",
    ("dim_feedforward",): "model.dim_feedforward",
    ("pre_norm",): "model.pre_norm",
    ("position_embedding",): "model.position_embedding",
}


PAPER_MODELS = {"resnet50": "detr_r50", "resnet101": "detr_r101"}


# the official release's file names, e.g. detr-r101-dc5-a2e86def.pth
OFFICIAL_FILE_NAME = re.compile(r"detr-r(50|101)(-dc5)?(-panoptic)?-[0-9a-f]{8}\.pth")


def check_architecture(info: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse (SetupError) a ``pretrained`` checkpoint whose weights belong to another
    architecture than the config's, or that records another backbone norm or head count,
    naming each override that fixes it; warn when an official file's name says DC5 and the
    config does not, or the other way round (the weights fit both)."""
    theirs = info["model"]
    defaults = {("backbone", "num_stages"): 4}  # read off the weights only when it is 3
    lines, fixes = [], []
    for path, override in ARCHITECTURE_OVERRIDES.items():
        value = _setting(theirs, path, defaults.get(path))
        ours = _setting(model, path)
        if value is None or ours == value:  # None: not recorded (older or official files)
            continue
        key = "backbone" if path == ("backbone", "name") else path[-1]
        fix = f"{override}={str(value).lower() if isinstance(value, bool) else value}"
        fixes.append(fix)
        if key == "backbone" and value in PAPER_MODELS:
            fix += f" (model={PAPER_MODELS[value]} for the paper's {value} model)"
        lines.append(f"  {key}: checkpoint {value}, config {ours}: set {fix}")
    if lines:
        if len(fixes) > 1:
            lines.append(f"  all together: {' '.join(fixes)}")
        raise SetupError(
            f"pretrained={info['path']} holds the weights of another architecture than the "
            "config builds:\n" + "\n".join(lines) + "\nOnly the class head may differ (it is "
            "re-initialized when the dataset's classes differ from the checkpoint's)."
        )
    name = Path(info["path"]).name
    official = OFFICIAL_FILE_NAME.fullmatch(name)
    dilation = bool(_setting(model, ("backbone", "dilation")))
    if official and bool(official.group(2)) != dilation:
        log.warning(
            "%s is the official %s checkpoint, but the config %s the last stage (dilation=%s): "
            "the weights fit either way, but they were trained %s. For the model they come "
            "from, use model=detr_r%s%s",
            info["path"],
            "DC5" if official.group(2) else "non-DC5",
            "dilates" if dilation else "does not dilate",
            str(dilation).lower(),
            "with it" if official.group(2) else "without it",
            official.group(1),
            "_dc5" if official.group(2) else "",
        )


def _setting(spec: dict[str, Any], path: tuple[str, ...], default: Any = None) -> Any:
    """The value at ``path`` in a nested spec, or ``default``."""
    for key in path:
        if not isinstance(spec, dict) or key not in spec:
            return default
        spec = spec[key]
    return spec


def _class_head_differs(info: dict[str, Any], module: DETRModule) -> bool:
    """Whether the checkpoint's class head predicts other labels than the module's."""
    theirs = info["model"]["num_classes"]
    if theirs != module.model.num_classes:
        log.info(
            "%s has %d classes, the model %d: re-initializing the class head",
            info["path"],
            theirs,
            module.model.num_classes,
        )
        return True
    if info["label_map"] is None:
        log.warning(
            "%s stores no label map: assuming its %d labels mean the dataset's (%s); "
            "pass a checkpoint with a label map, or a model.num_classes that differs, to "
            "re-initialize the class head instead",
            info["path"],
            theirs,
            ", ".join(module.class_names[:5]),
        )
        return False
    if padded_label_map(info["label_map"], theirs).to_dict() != module.label_map:
        log.info(
            "%s was trained on other labels (category ids or names differ from the dataset's): "
            "re-initializing the class head",
            info["path"],
        )
        return True
    return False
