"""Where the entry points find their configs, the schema of the groups that build the model,
and composing configs from Python.

The configs ship inside the package (``detr_lightning/conf``), so every command works from any
directory of any installation: Hydra finds them through the ``pkg://`` search path.

The ``backbone``, ``model``, ``loss`` and ``postprocess`` groups are config specs whose keys
are the arguments of the constructors that build them, with no renaming. Their keys and
defaults have one source, those constructors' signatures: :func:`register_schemas` puts one
node per group (``_target_`` and every argument at its default) into Hydra's config store
as ``schema/<group>``, and each YAML file of the group starts from it
(``defaults: [/schema@_here_: model]``) and states only what the recipe changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig

from ..checkpoints.legacy import BACKBONE_TARGET, CRITERION_TARGET, MODEL_TARGET, POSTPROCESS_TARGET
from ..models import DETR, Backbone, HungarianMatcher, PostProcess, SetCriterion, Transformer
from ..models.criterion import CRITERION_FROM_MODEL
from ..models.detr import DETR_MODULES
from ..utils.errors import SetupError
from ..utils.signatures import keyword_defaults
from . import hydra_dirs

# what @hydra.main takes as config_path
CONFIG_PATH = "pkg://detr_lightning.conf"
CONFIG_MODULE = "detr_lightning.conf"

__all__ = ["CONFIG_MODULE", "CONFIG_PATH", "compose_config", "group_schemas", "register_schemas"]


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


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<name>.yaml`` with Hydra ``overrides``, as the command would compose it (without
    its ``hydra`` node's run-time values); a bad override raises SetupError."""
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except HydraException as err:
        raise SetupError(str(err)) from None
