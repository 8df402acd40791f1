"""The ``${detr.run_dir:DEFAULT}`` resolver of the entry points' ``hydra.run.dir``.

Checkpoints, metrics and plots go to ``run_dir``; Hydra writes its log (``train.log``) and
``.hydra/`` to its own output directory. ``run_dir`` defaults to that directory, so the two are
one. For a ``run_dir=PATH`` given on the command line, Hydra's directory must follow it, or the
log and ``.hydra/`` land in ``outputs/<task>/<time>/`` of the current directory, away from the
run. ``hydra.run.dir: ${detr.run_dir:DEFAULT}`` is that ``run_dir`` when the user set one, and
``DEFAULT`` when ``run_dir`` is still the interpolation of Hydra's directory (``hydra.run.dir``
itself can then not refer to it: it would refer to itself). Multi-runs (sweeps) keep Hydra's
sweep directories, which ``run_dir`` follows by default.

Registered when the package is imported; the entry scripts import it before ``@hydra.main``
resolves the config.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

RESOLVER = "detr.run_dir"
DEFAULT_RUN_DIR = "${hydra:runtime.output_dir}"


def run_dir_given(cfg: DictConfig) -> bool:
    """Whether ``cfg.run_dir`` was set (on the command line or in a config) rather than left
    as Hydra's directory."""
    if "run_dir" not in cfg:
        return False
    raw = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["run_dir"]), resolve=False)
    return raw.get("run_dir") not in (None, DEFAULT_RUN_DIR)


def hydra_run_dir(default: str, *, _root_: DictConfig) -> str:
    """``run_dir`` if the config sets it to something else than Hydra's directory, else
    ``default``."""
    return str(_root_.run_dir) if run_dir_given(_root_) else default


def without_resolver(pattern: str) -> str:
    """``hydra.run.dir`` as written in the configs, ``${detr.run_dir:'DEFAULT'}``, shown as
    ``DEFAULT`` (other patterns unchanged)."""
    default = re.fullmatch(r"\$\{" + re.escape(RESOLVER) + r":'(.*)'\}", pattern)
    return default.group(1) if default else pattern


def register() -> None:
    """Register the resolver (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, hydra_run_dir)


register()
