"""One flat set of settings shared out among the constructors it is meant for, by their
signatures: how a config group whose keys are the arguments of several classes (the ``model``
group: :class:`~detr_lightning.models.DETR`'s and the transformer's) builds them, and where
that group's keys and defaults come from (the signatures are their one source)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["keyword_defaults", "split_keywords"]


def _keywords(target: Callable[..., Any], exclude: Collection[str]) -> dict[str, Any]:
    """``target``'s named parameters (not ``*args``/``**kwargs``, not ``exclude``) and their
    defaults (``inspect.Parameter.empty`` where there is none)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: parameter.default
        for name, parameter in inspect.signature(target).parameters.items()
        if parameter.kind in kinds and name not in exclude
    }


def keyword_defaults(*targets: Callable[..., Any], exclude: Collection[str] = ()) -> dict[str, Any]:
    """The parameters of ``targets`` that have a default, with it (the first target that takes a
    name gives its default); a dataclass default (a group of settings) as a dict of its
    fields, as a config writes it."""
    defaults: dict[str, Any] = {}
    for target in targets:
        for name, default in _keywords(target, exclude).items():
            if default is inspect.Parameter.empty:
                continue
            if dataclasses.is_dataclass(default) and not isinstance(default, type):
                default = dataclasses.asdict(default)
            defaults.setdefault(name, default)
    return defaults


def split_keywords(
    settings: Mapping[str, Any], *targets: Callable[..., Any], exclude: Collection[str] = ()
) -> list[dict[str, Any]]:
    """``settings`` shared out among ``targets``: one dict of keyword arguments per target, each
    key going to the first target that takes it. A key that none takes is a ValueError naming
    it and the keys there are."""
    parts: list[dict[str, Any]] = [{} for _ in targets]
    names = [_keywords(target, exclude) for target in targets]
    for key, value in settings.items():
        index = next((i for i, taken in enumerate(names) if key in taken), None)
        if index is None:
            known = sorted({name for taken in names for name in taken})
            raise ValueError(f"unknown setting {key!r}; the settings are {known}")
        parts[index][key] = value
    return parts
