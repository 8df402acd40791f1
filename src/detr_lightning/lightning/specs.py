"""Objects from the config specs that checkpoints store: mappings with a ``_target_`` (and
``_partial_``), as Hydra's config groups write them.

A checkpoint rebuilds its module from such plain mappings, with no config files, so the module
instantiates them itself; this is the one place below the command line that calls Hydra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate

__all__ = ["build"]


def build(spec: Mapping[str, Any], **kwargs: Any) -> Any:
    """The object (or, for ``_partial_: true``, the partial) that ``spec`` describes, with
    ``kwargs`` added to its arguments; nested specs are built first, containers are plain
    Python."""
    return instantiate(spec, **kwargs, _convert_="all")
