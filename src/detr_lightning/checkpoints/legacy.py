"""Settings written by the first, flat layout of the package, in today's layout.

Checkpoints, export directories and ``.hydra/config.yaml`` files of that layout keep working:

- a flat ``model`` mapping (``build_detr``'s old keywords, the backbone's merged in as
  ``backbone`` (its name), ``pretrained_backbone``, ``backbone_weights`` ...) with the
  backbone's learning rate beside it as ``backbone_lr`` becomes the ``model`` spec, whose
  ``backbone`` is a :class:`~detr_lightning.models.Backbone` spec with that ``lr``;
- ``loss`` and ``postprocess`` mappings without ``_target_`` become the specs of
  :func:`~detr_lightning.models.build_criterion` and
  :class:`~detr_lightning.models.PostProcess` (their keys did not change);
- ``_target_`` paths of modules that moved (``detr_lightning.schedules.step_lr``,
  ``detr_lightning.callbacks.StepCheckpoint``, ...) point to their new modules.

Plain mappings in, plain mappings out: the configs' own upgrade, which also warns, is
:func:`detr_lightning.cli.config.upgrade_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BACKBONE_TARGET",
    "CRITERION_TARGET",
    "MODEL_TARGET",
    "POSTPROCESS_TARGET",
    "is_legacy_model",
    "moved_target",
    "upgrade_model",
    "upgrade_module_hparams",
    "upgrade_targets",
]

MODEL_TARGET = "detr_lightning.models.build_detr"
BACKBONE_TARGET = "detr_lightning.models.Backbone"
CRITERION_TARGET = "detr_lightning.models.build_criterion"
POSTPROCESS_TARGET = "detr_lightning.models.PostProcess"

# the flat layout's keys of the backbone inside ``model`` -> the Backbone argument
LEGACY_BACKBONE_KEYS = {
    "backbone": "name",
    "dilation": "dilation",
    "pretrained_backbone": "pretrained",
    "backbone_weights": "weights",
    "norm": "norm",
    "trainable_layers": "trainable_layers",
    "num_stages": "num_stages",
}

# modules of the flat layout that config targets named -> where their objects live now
MOVED_MODULES = {
    "detr_lightning.schedules": "detr_lightning.lightning.optim",
    "detr_lightning.callbacks": "detr_lightning.lightning.callbacks",
    "detr_lightning.loggers": "detr_lightning.lightning.loggers",
    "detr_lightning.sweeps": "detr_lightning.cli.sweeps",
    "detr_lightning.data.CocoDataModule": "detr_lightning.lightning.CocoDataModule",
    "detr_lightning.data.datamodule": "detr_lightning.lightning.datamodule",
}
# callbacks.NonFiniteStop moved beside the skip it ends
MOVED_OBJECTS = {"detr_lightning.callbacks.NonFiniteStop": "detr_lightning.lightning.nonfinite"}


def moved_target(target: str) -> str:
    """``target`` (a ``_target_`` path) in today's layout; unchanged when nothing moved."""
    for old, module in MOVED_OBJECTS.items():
        if target == old:
            return f"{module}.{old.rsplit('.', 1)[1]}"
    for old, new in MOVED_MODULES.items():
        if target == old or target.startswith(old + "."):
            return new + target[len(old) :]
    return target


def upgrade_targets(node: Any) -> Any:
    """A copy of ``node`` (nested mappings and lists) with every ``_target_`` moved."""
    if isinstance(node, Mapping):
        return {
            key: moved_target(value) if key == "_target_" and isinstance(value, str)
            else upgrade_targets(value)
            for key, value in node.items()
        }  # fmt: skip
    if isinstance(node, list):
        return [upgrade_targets(value) for value in node]
    return node


def is_legacy_model(model: Mapping[str, Any]) -> bool:
    """Whether ``model`` is the flat layout's (no ``_target_``; the backbone's name, a string,
    under ``backbone``)."""
    return "_target_" not in model


def upgrade_model(model: Mapping[str, Any], backbone_lr: float | None = None) -> dict[str, Any]:
    """The ``model`` spec of a flat ``model`` mapping; ``backbone_lr`` (the old module's
    separate setting) becomes the backbone's ``lr``. A spec is returned as it is."""
    if not is_legacy_model(model):
        return dict(model)
    backbone: dict[str, Any] = {"_target_": BACKBONE_TARGET}
    spec: dict[str, Any] = {"_target_": MODEL_TARGET}
    frozen = False
    for key, value in model.items():
        if key in LEGACY_BACKBONE_KEYS:
            backbone[LEGACY_BACKBONE_KEYS[key]] = value
        elif key == "train_backbone":
            frozen = not value
        else:
            spec[key] = value
    if backbone_lr is not None:
        backbone["lr"] = float(backbone_lr)
    if frozen:
        backbone["lr"] = 0.0
    spec["backbone"] = backbone
    return spec


def upgrade_module_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """DETRModule settings (``hyper_parameters`` of a checkpoint, ``hparams`` of an export) in
    today's layout; settings already in it come back unchanged."""
    upgraded = dict(hparams)
    backbone_lr = upgraded.pop("backbone_lr", None)
    if upgraded.get("model") is not None:
        model = upgraded["model"]
        if not is_legacy_model(model) and backbone_lr is not None:
            model = {**model, "backbone": {**model["backbone"], "lr": float(backbone_lr)}}
        upgraded["model"] = upgrade_model(model, backbone_lr)
    for key, target in (("loss", CRITERION_TARGET), ("postprocess", POSTPROCESS_TARGET)):
        if upgraded.get(key) is not None and "_target_" not in upgraded[key]:
            upgraded[key] = {"_target_": target, **upgraded[key]}
    return upgrade_targets(upgraded)
