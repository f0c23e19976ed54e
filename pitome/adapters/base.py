"""What every adapter provides, and the error for models none supports.

An adapter recognises its models by class name (so no optional library is imported to
patch), describes where their blocks, keys and prefix tokens are, gives the family's
defaults, and returns the :class:`~pitome.runtime.patcher.Patch` it made. Unpatching,
re-patching, copying and pickling are the patcher's, not the adapter's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from torch import nn

from ..core.schedule import MarginSpec
from ..runtime.patcher import Patch
from ..runtime.state import MergeConfig


class Adapter(Protocol):
    name: str
    supported: str

    def matches(self, model: nn.Module) -> bool: ...

    def margin_for(self, model: nn.Module) -> MarginSpec: ...

    def merge_blocks_for(self, model: nn.Module,
                         per_block: bool = False) -> tuple[int, ...] | None:
        """The blocks ``model`` merges in unless told otherwise (None: all). ``per_block``:
        for a per-block schedule, which says where to merge itself; only blocks whose
        output the model never reads are then left out."""
        ...

    def preset_for(self, model: nn.Module, algo: str) -> str: ...

    def patch(self, model: nn.Module, config: MergeConfig) -> Patch:
        """Check ``model`` (raising :class:`UnsupportedModelError` before changing anything)
        and make its blocks merge; returns every change made."""
        ...


class UnsupportedModelError(TypeError):
    """Raised for a model no adapter can patch; the message lists what is supported."""

    def __init__(self, what: str, supported: Iterable[str]) -> None:
        listed = "\n  ".join(supported)
        super().__init__(f"pitome cannot patch a {what}. Supported models:\n  {listed}")
