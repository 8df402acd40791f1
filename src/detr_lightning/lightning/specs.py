"""Objects from the config specs that checkpoints store: mappings with a ``_target_`` (and
``_partial_``), as Hydra's config groups write them.

A checkpoint rebuilds its module from such plain mappings, with no config files, so the module
instantiates them itself; this is the one place below the command line that calls Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["build", "plain"]


def build(spec: Mapping[str, Any], **kwargs: Any) -> Any:
    """The object (or, for ``_partial_: true``, the partial) that ``spec`` describes, with
    ``kwargs`` added to its arguments; nested specs are built first, containers are plain
    Python."""
    return instantiate(spec, **kwargs, _convert_="all")


def plain(value: Any) -> Any:
    """``value`` as builtins (dicts, lists, scalars), config containers resolved: what a
    checkpoint may hold and still load with ``weights_only=True``."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value
