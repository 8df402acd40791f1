"""Where the entry points find their configs, and composing them from Python.

The configs ship inside the package (``detr_lightning/conf``), so every command works from any
directory of any installation: Hydra finds them through the ``pkg://`` search path.
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig

from ..utils.errors import SetupError
from . import hydra_dirs

# what @hydra.main takes as config_path
CONFIG_PATH = "pkg://detr_lightning.conf"
CONFIG_MODULE = "detr_lightning.conf"

hydra_dirs.register()  # the configs' ${detr.run_dir:...} must resolve wherever they compose

__all__ = ["CONFIG_MODULE", "CONFIG_PATH", "compose_config"]


def compose_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/<name>.yaml`` with Hydra ``overrides``, as the command would compose it (without
    its ``hydra`` node's run-time values); a bad override raises SetupError."""
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name=name, overrides=list(overrides))
    except HydraException as err:
        raise SetupError(str(err)) from None
