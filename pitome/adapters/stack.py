"""What every adapter that swaps layer classes shares: one merge state handed along a stack.

The model's own forward loops over its layers; the patched layers share a :class:`StackRun`.
The first layer starts the forward's :class:`MergeState` (reading padding from the mask the
model built), each layer merges between its attention and MLP, the last records
:func:`pitome.merge_info` and lets the state go.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.attention import received_attention
from ..core.state import MergeConfig, MergeState
from .base import record_info

RUN_ATTR = "_pitome_run"
INDEX_ATTR = "_pitome_index"


class StackRun:
    """What the patched layers of one stack share: the config and the live forward's state."""

    def __init__(self, owner: nn.Module, config: MergeConfig, num_prefix: int, heads: int,
                 num_layers: int) -> None:
        self.owner, self.config = owner, config
        self.num_prefix, self.heads, self.num_layers = num_prefix, heads, num_layers
        self.state: MergeState | None = None
        self.last_sizes: torch.Tensor | None = None
        self.tokens_in = 0
        self.keys: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.returns_tuple = False  # the layers' callers expect ``(hidden_states,)``

    def begin(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> MergeState:
        self.tokens_in = x.shape[1]
        self.state = MergeState(self.config, x, self.num_prefix, self.num_layers,
                                padding=real_tokens(attention_mask, x.shape[1]))
        return self.state

    def finish(self) -> None:
        if self.state is not None:
            record_info(self.owner, self.state.info(self.tokens_in))
            self.last_sizes = self.state.sizes
        self.state = self.keys = self.queries = None

    def head_mean(self, projected: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = projected.shape
        return projected.view(batch, tokens, self.heads, width // self.heads).mean(dim=2)

    def received(self, bias: torch.Tensor | None, scale: float) -> torch.Tensor | None:
        if self.state is None or not self.state.needs_attention:
            return None
        batch, tokens, width = self.keys.shape  # type: ignore[union-attr]
        split = (batch, tokens, self.heads, width // self.heads)
        q = self.queries.view(split).transpose(1, 2)  # type: ignore[union-attr]
        k = self.keys.view(split).transpose(1, 2)  # type: ignore[union-attr]
        return received_attention(q, k, scale, bias, self.state)


def real_tokens(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """``B×T`` True for real tokens, from a 2-D 0/1 mask or a 4-D boolean or additive mask."""
    if attention_mask is None:
        return None
    flat = attention_mask.dim() == 2
    mask = attention_mask if flat else attention_mask[:, 0, 0, :]
    if mask.shape[-1] != tokens:
        raise ValueError(f"attention mask covers {mask.shape[-1]} tokens, the input has {tokens}")
    return mask.bool() if mask.dtype == torch.bool or flat and mask.max() <= 1 else mask == 0


class MergingLayer:
    """Shared by every layer kind: start and end the forward's state, merge the residual."""

    def _pitome_enter(self, x: torch.Tensor, attention_mask: torch.Tensor | None
                      ) -> tuple[StackRun, MergeState]:
        run: StackRun = self.__dict__[RUN_ATTR]
        if self.__dict__[INDEX_ATTR] == 0 or run.state is None:
            run.begin(x, attention_mask)
        return run, run.state  # type: ignore[return-value]

    def _pitome_merge(self, run: StackRun, x: torch.Tensor, bias: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
        state = run.state
        metric = run.head_mean(run.keys) if state.config.metric == "keys" else x
        return state.merge(x, metric, self.__dict__[INDEX_ATTR], run.received(bias, scale))

    def _pitome_unmerged(self, run: StackRun, x: torch.Tensor) -> bool:
        """Whether no token has merged yet, so the mask the model built still fits ``x``."""
        return x.shape[1] == run.tokens_in

    def _pitome_exit(self, run: StackRun, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor]:
        if self.__dict__[INDEX_ATTR] == run.num_layers - 1:
            run.finish()
        return (x,) if run.returns_tuple else x
