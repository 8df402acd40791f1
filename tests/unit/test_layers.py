"""The package's architecture holds: import-linter's contracts (pyproject.toml: layers, no
circles, Hydra only where configs are handled), and Lightning's internals read in one module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "src" / "detr_lightning"
COMPAT = PACKAGE / "lightning" / "compat.py"

# What Lightning keeps to itself (private attributes, its loops' state, a private launcher
# class) and this package reads or sets: only lightning/compat.py may name them.
LIGHTNING_INTERNALS = {
    "_trainer",
    "_signal_connector",
    "_accelerator_connector",
    "_logger_connector",
    "_batches_that_stepped",
    "_should_accumulate",
    "_check_log_dir_exists",
    "_experiment",
    "_fs",
    "fit_loop",
    "_MultiProcessingLauncher",
}


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def _named(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # getattr(trainer, "_signal_connector", None)
    return names


def test_lightning_internals_only_in_compat():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path == COMPAT:
            continue
        found = _named(ast.parse(path.read_text())) & LIGHTNING_INTERNALS
        if found:
            offenders[str(path.relative_to(PACKAGE))] = sorted(found)
    assert not offenders, f"Lightning internals outside lightning/compat.py: {offenders}"
    # and the names are real: compat uses each of them
    assert _named(ast.parse(COMPAT.read_text())) >= LIGHTNING_INTERNALS
