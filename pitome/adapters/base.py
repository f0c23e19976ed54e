"""Reversible class swapping and the adapter registry.

Patching replaces a module's class with a subclass that adds merging (tomesd's approach):
weights, buffers and ``state_dict`` keys are untouched, ``unpatch`` swaps the original class
back, and optional libraries are recognised by class name so none is imported to patch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

from ..core.schedule import MarginSpec
from ..core.state import MergeConfig, MergeInfo

CONFIG_ATTR = "_pitome_config"
INFO_ATTR = "_pitome_info"
_PARENT_ATTR = "_pitome_parent"
_SUBCLASSES: dict[tuple[type, type], type] = {}


def class_names(module: nn.Module) -> set[str]:
    """Names of every class in the module's MRO."""
    return {cls.__name__ for cls in type(module).__mro__}


def is_patched(module: nn.Module) -> bool:
    return _PARENT_ATTR in type(module).__dict__


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the behaviour of ``mixin`` on top of its own class."""
    base = type(module)
    key = (mixin, base)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Merging{base.__name__}", (mixin, base), {_PARENT_ATTR: base})
    module.__class__ = _SUBCLASSES[key]


def restore_class(module: nn.Module) -> None:
    """Undo :func:`swap_class`; a no-op on unpatched modules."""
    if is_patched(module):
        module.__class__ = type(module).__dict__[_PARENT_ATTR]


def record_info(model: nn.Module, info: MergeInfo) -> None:
    """Keep the last forward's merge info on the model (skipped while compiling)."""
    if not torch.compiler.is_compiling():
        object.__setattr__(model, INFO_ATTR, info)


class Adapter(Protocol):
    name: str
    supported: str

    def matches(self, model: nn.Module) -> bool: ...

    def margin_for(self, model: nn.Module) -> MarginSpec: ...

    def merge_blocks_for(self, model: nn.Module) -> tuple[int, ...] | None: ...

    def preset_for(self, model: nn.Module, algo: str) -> str: ...

    def patch(self, model: nn.Module, config: MergeConfig) -> None: ...

    def unpatch(self, model: nn.Module) -> None: ...


class UnsupportedModelError(TypeError):
    """Raised for a model no adapter can patch; the message lists what is supported."""

    def __init__(self, what: str, supported: Iterable[str]) -> None:
        listed = "\n  ".join(supported)
        super().__init__(f"pitome cannot patch a {what}. Supported models:\n  {listed}")
