"""Configs of the package's first, flat layout (a run's ``.hydra/config.yaml``, a config
directory of one's own) composed into today's layout, with a warning that says what changed.

The checkpoints' settings are upgraded by :mod:`detr_lightning.checkpoints.legacy`; this is
the same for a composed config, which also keeps its interpolations.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..checkpoints.legacy import (
    BACKBONE_TARGET,
    CRITERION_TARGET,
    MODEL_TARGET,
    POSTPROCESS_TARGET,
    upgrade_targets,
)

log = logging.getLogger(__name__)

__all__ = ["upgrade_config"]

# groups that gained a _target_: the group, its target
SPEC_GROUPS = {
    "backbone": BACKBONE_TARGET,
    "model": MODEL_TARGET,
    "loss": CRITERION_TARGET,
    "postprocess": POSTPROCESS_TARGET,
}


def upgrade_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` in today's layout: ``_target_`` paths of moved modules point to their new
    modules, and the ``backbone``, ``model``, ``loss`` and ``postprocess`` nodes of the flat
    layout (their keys are today's, without a ``_target_``) become specs, the model's
    ``backbone`` the backbone group's. A config in today's layout comes back as it is."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    upgraded: dict[str, Any] = upgrade_targets(raw)
    changes = ["the _target_ of moved modules"] if upgraded != raw else []
    for group, target in SPEC_GROUPS.items():
        node = upgraded.get(group)
        if isinstance(node, dict) and "_target_" not in node:
            upgraded[group] = {"_target_": target, **node}
            if group == "model":
                upgraded[group]["backbone"] = "${backbone}"
            changes.append(group)
    if not changes:
        return cfg
    log.warning(
        "this config was written by an earlier version of detr-lightning; it runs as today's "
        "(%s upgraded). Compose a new one from the package's configs to drop this warning",
        ", ".join(changes),
    )
    result = OmegaConf.create(upgraded)
    OmegaConf.set_struct(result, OmegaConf.is_struct(cfg))
    return result
