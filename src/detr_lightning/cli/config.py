"""Where the entry points find their configs, the schema of the groups that build the model,
composing configs from Python, and configs of the package's first layout upgraded.

The configs ship inside the package (``detr_lightning/conf``), so every command works from any
directory of any installation: Hydra finds them through the ``pkg://`` search path.

The ``backbone``, ``model``, ``loss`` and ``postprocess`` groups are config specs whose keys
are the arguments of the constructors that build them, with no renaming. Their keys and
defaults have one source, those constructors' signatures: :func:`register_schemas` puts one
node per group (``_target_`` and every argument at its default) into Hydra's config store
as ``schema/<group>``, and each YAML file of the group starts from it
(``defaults: [/schema@_here_: model]``) and states only what the recipe changes.

Configs written by the package's first, flat layout (a run's ``.hydra/config.yaml``, a config
directory of one's own) run as today's through :func:`upgrade_config`, with a warning; the
checkpoints' settings are upgraded by :mod:`detr_lightning.checkpoints.legacy`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from ..checkpoints.legacy import (
    BACKBONE_TARGET,
    CRITERION_TARGET,
    MODEL_TARGET,
    POSTPROCESS_TARGET,
    upgrade_targets,
)
from ..models import DETR, Backbone, HungarianMatcher, PostProcess, SetCriterion, Transformer
from ..models.criterion import CRITERION_FROM_MODEL
from ..models.detr import DETR_MODULES
from ..utils.errors import SetupError
from ..utils.signatures import keyword_defaults
from . import hydra_dirs
from .sweeps import register_search_schema

log = logging.getLogger(__name__)

# what @hydra.main takes as config_path
CONFIG_PATH = "pkg://detr_lightning.conf"
CONFIG_MODULE = "detr_lightning.conf"

__all__ = [
    "CONFIG_MODULE",
    "CONFIG_PATH",
    "compose_config",
    "group_schemas",
    "register_schemas",
    "upgrade_config",
]


def group_schemas() -> dict[str, dict[str, Any]]:
    """The schema of each group that builds the model: its ``_target_`` and the arguments of
    the constructors behind it, at their defaults (the paper's values)."""
    return {
        "backbone": {"_target_": BACKBONE_TARGET, **keyword_defaults(Backbone)},
        "model": {
            "_target_": MODEL_TARGET,
            "backbone": "${backbone}",  # the backbone group's spec, built first
            **keyword_defaults(DETR, Transformer, exclude=DETR_MODULES),
        },
        "loss": {
            "_target_": CRITERION_TARGET,
            **keyword_defaults(HungarianMatcher, SetCriterion, exclude=CRITERION_FROM_MODEL),
        },
        "postprocess": {"_target_": POSTPROCESS_TARGET, **keyword_defaults(PostProcess)},
    }


def register_schemas() -> None:
    """Store :func:`group_schemas` as ``schema/<group>`` in Hydra's config store (idempotent)."""
    store = ConfigStore.instance()
    for group, node in group_schemas().items():
        store.store(group="schema", name=group, node=node)


# on import: every entry point and test imports this module before it composes a config
hydra_dirs.register()  # the configs' ${detr.run_dir:...}
register_schemas()
register_search_schema()  # hydra/sweeper: optuna of the hparams_search configs


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<name>.yaml`` with Hydra ``overrides``, as the command would compose it (without
    its ``hydra`` node's run-time values); a bad override raises SetupError."""
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except HydraException as err:
        raise SetupError(str(err)) from None


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
