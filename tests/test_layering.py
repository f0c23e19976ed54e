"""Imports flow one way: core → kernels → algorithms → runtime → adapters → api → analysis,
tasks → cli. A module may import its own layer or any layer below it, never one above."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pitome"
LAYERS = {  # rank of each top-level part of the package
    "_optional": 0, "core": 1, "kernels": 2, "algorithms": 3, "runtime": 4, "adapters": 5,
    "api": 6, "cuda_graph": 6, "models": 6, "llava": 6, "generation": 6, "__init__": 6,
    "analysis": 7, "tasks": 7, "bench": 7, "calibration": 7, "cli_common": 8, "cli_eval": 9,
    "cli_finetune": 9, "cli_calibrate": 9, "cli": 10,
}


def _part(module: Path) -> str:
    relative = module.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def _imported_parts(module: Path) -> set[str]:
    """Top-level parts of pitome that ``module`` imports, at any depth of its code."""
    depth = len(module.relative_to(PACKAGE).parts) - 1  # 0 for pitome/x.py
    parts = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            up = node.level - 1
            if up > depth:
                continue
            base = list(module.relative_to(PACKAGE).parts[:depth - up])
            names = [*base, *(node.module.split(".") if node.module else [])]
            if names:
                parts.add(names[0].removesuffix(".py"))
            else:  # ``from .. import name``: the package itself, or its submodules
                parts.update(alias.name if (PACKAGE / alias.name).exists()
                             or (PACKAGE / f"{alias.name}.py").exists() else "__init__"
                             for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pitome."):
            parts.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            parts.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("pitome."))
    return parts


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer():
    assert {_part(module) for module in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(module):
    own = _part(module)
    if own == "__init__":
        return  # the package's face re-exports from every layer below the CLI
    upward = {part for part in _imported_parts(module) - {own}
              if LAYERS[part] > LAYERS[own] or (LAYERS[part] == LAYERS[own] and part != own
                                               and own in ("cli_eval", "cli_finetune",
                                                           "cli_calibrate"))}
    assert not upward, f"{module.relative_to(PACKAGE)} imports {sorted(upward)} from above it"
