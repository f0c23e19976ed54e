"""Lazy imports of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependencyError(ImportError):
    pass


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or explain which ``pitome[extra]`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{module.split('.')[0]} is needed here but is not installed: "
            f"pip install 'pitome[{extra}]'") from error
