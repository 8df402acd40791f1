"""A search space in the syntax of Hydra's Optuna sweeper, as Optuna's ``trial.suggest_*``.

``hparams_search`` configs state each searched key as a Hydra sweep expression
(``hydra.sweeper.params``); on ``detr-tune``'s command line a sweep expression adds a key to
the search or replaces its range, and a plain value fixes a searched key:

============================== ===========================================================
``interval(a, b)``             ``suggest_float(key, a, b)``
``tag(log, interval(a, b))``   ``suggest_float(key, a, b, log=True)``
``range(a, b[, step])``        ``suggest_int`` (``suggest_float`` for float bounds) over the
                               values of Python's ``range``: ``a, a + step, ... < b``
``tag(log, range(a, b))``      ``suggest_int(key, a, b - 1, log=True)`` (step 1)
``choice(x, y, ...)``, ``x,y`` ``suggest_categorical(key, [x, y, ...])``
============================== ===========================================================

Group selections are searched like values (``schedule: choice(step, cosine)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import HydraException

from ..utils.errors import SetupError

__all__ = ["SearchParam", "override_line", "parse_param", "search_space", "suggest"]

CATEGORICAL_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class SearchParam:
    """One searched key: ``target`` is the key as an override writes it (``+key`` adds it)."""

    target: str
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = field(default=())

    @property
    def name(self) -> str:
        """The key without an override's ``+``/``++``/``~`` prefix (Optuna's param name)."""
        return self.target.lstrip("+~")


def _range_param(target: str, sweep: RangeSweep, log: bool) -> SearchParam:
    start, stop, step = sweep.start, sweep.stop, sweep.step
    if step is None or step <= 0 or start >= stop:
        raise SetupError(f"{target}: range({start}, {stop}, {step}) must count up (step > 0)")
    last = start + step * (math.ceil((stop - start) / step) - 1)  # Python's last range value
    if all(isinstance(v, int) for v in (start, stop, step)):
        if log and step != 1:
            raise SetupError(f"{target}: tag(log, range(...)) needs step 1 (Optuna's log scale)")
        return SearchParam(target, "int", start, last, step, log)
    if log:
        raise SetupError(f"{target}: tag(log, range(...)) needs integers; use tag(log, interval)")
    return SearchParam(target, "float", float(start), float(last), float(step))


def parse_param(target: str, expression: Any) -> SearchParam | None:
    """``expression`` (a Hydra sweep such as ``"tag(log, interval(1e-5, 1e-3))"``) for the key
    ``target``; None for a plain value, which fixes the key. A sweep that Optuna cannot search
    raises SetupError naming the key."""
    try:
        (override,) = OverridesParser.create().parse_overrides([f"{target}={expression}"])
    except HydraException as err:
        raise SetupError(f"{target}={expression} is not a Hydra override: {err}") from None
    if not override.is_sweep_override():
        return None
    sweep = override.value()
    unknown = set(getattr(sweep, "tags", ())) - {"log"}
    if unknown:
        raise SetupError(f"{target}: unknown tag {sorted(unknown)} (only tag(log, ...) is read)")
    log = "log" in getattr(sweep, "tags", ())
    if isinstance(sweep, IntervalSweep):
        if log and sweep.start <= 0:
            raise SetupError(f"{target}: tag(log, interval(...)) needs a lower bound above 0")
        return SearchParam(target, "float", float(sweep.start), float(sweep.end), log=log)
    if isinstance(sweep, RangeSweep):
        return _range_param(target, sweep, log)
    if isinstance(sweep, ChoiceSweep) and not log:
        bad = [v for v in sweep.list if not isinstance(v, CATEGORICAL_TYPES)]
        if bad:
            raise SetupError(f"{target}: choice(...) of {bad}: Optuna chooses among scalars")
        return SearchParam(target, "categorical", choices=tuple(sweep.list))
    raise SetupError(
        f"{target}={expression}: search with interval(...), tag(log, interval(...)), "
        "range(...) or choice(...)"
    )


def search_space(
    params: Mapping[str, Any], overrides: Sequence[str]
) -> tuple[dict[str, SearchParam], list[str]]:
    """The searched keys of a config's ``params`` and the command line's ``overrides``, and
    the overrides that every trial gets (the plain ones). A sweep on the command line searches
    its key (over the config's range, if any); a plain value takes the key out of the search."""
    space = {}
    for key, expression in params.items():
        param = parse_param(str(key), expression)
        if param is None:
            raise SetupError(
                f"hydra.sweeper.params.{key}={expression} is not a sweep: search it with "
                "interval(...), range(...) or choice(...), or set the key outside params"
            )
        space[param.name] = param
    fixed = []
    for line in overrides:
        target, _, expression = line.partition("=")
        param = parse_param(target, expression)
        if param is None:
            space.pop(target.lstrip("+~"), None)
            fixed.append(line)
        else:
            space[param.name] = param
    return space, fixed


def suggest(trial: Any, param: SearchParam) -> Any:
    """The value an Optuna ``trial`` proposes for ``param``."""
    if param.kind == "categorical":
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.kind == "int":
        step = int(param.step or 1)
        return trial.suggest_int(param.name, int(param.low), int(param.high), step=step,
                                 log=param.log)  # fmt: skip
    return trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)


def _parses_to(line: str, value: Any) -> bool:
    try:
        (override,) = OverridesParser.create().parse_overrides([line])
    except HydraException:
        return False
    return override.value() == value and type(override.value()) is type(value)


def override_line(target: str, value: Any) -> str:
    """``target=value`` as a Hydra override that parses back to ``value`` (a string that
    would read as a number, ``null`` or with special characters is quoted)."""
    if value is None:
        return f"{target}=null"
    if isinstance(value, bool):
        return f"{target}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{target}={value!r}"
    line = f"{target}={value}"
    if _parses_to(line, value):
        return line
    return f"{target}='" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
