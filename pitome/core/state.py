"""Merge configuration (fixed at patch time) and merge state (one per forward pass)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import MergePlan
from .registry import Algorithm, MergeContext
from .schedule import MarginSpec, TokenSchedule, resolve_margin, token_counts


@dataclass(frozen=True)
class MergeConfig:
    """Everything ``pitome.patch`` decided: the algorithm and how to run it."""

    algo: str
    algorithm: Algorithm
    schedule: TokenSchedule
    margin: MarginSpec
    prop_attn: bool
    metric: str = "keys"
    trace_source: bool = False
    keep_plans: bool = False


@dataclass
class MergeInfo:
    """What the last forward pass did, readable through :func:`pitome.merge_info`.

    Attributes:
        token_counts: tokens entering each block, then the number leaving the last one.
        merges: tokens removed in each block.
        sizes: ``B×T×1`` input tokens each output token represents (None if nothing merged).
        source: ``B×T×N`` 0/1 membership of output tokens over input tokens (when traced).
        plans: the plan of every merging block, by block index (when ``keep_plans``).
    """

    algo: str
    token_counts: list[int]
    merges: list[int]
    sizes: torch.Tensor | None = None
    source: torch.Tensor | None = None
    plans: dict[int, MergePlan] = field(default_factory=dict)


class MergeState:
    """The running state of one forward pass, handed explicitly from block to block."""

    def __init__(self, config: MergeConfig, x: torch.Tensor, num_prefix: int, num_blocks: int,
                 padding: torch.Tensor | None = None) -> None:
        batch, tokens, _ = x.shape
        self.config = config
        self.num_prefix = num_prefix
        self.num_blocks = num_blocks
        self.merges = config.schedule.plan(tokens, num_prefix, num_blocks)
        self.sizes: torch.Tensor | None = None
        self.padding = padding
        self.source: torch.Tensor | None = None
        if config.trace_source:
            self.source = torch.eye(tokens, device=x.device).expand(batch, tokens, tokens)
        self.plans: dict[int, MergePlan] = {}

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Proportional attention: ``log s`` added to every key's logit, ``B×1×1×T``."""
        if not self.config.prop_attn or self.sizes is None:
            return None
        return self.sizes.log().to(dtype).transpose(1, 2).unsqueeze(1)

    @property
    def needs_attention(self) -> bool:
        """Whether this block's algorithm wants the attention received by each token."""
        return getattr(self.config.algorithm, "needs_attention", False)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, block: int,
              attention: torch.Tensor | None = None) -> torch.Tensor:
        """Merge the scheduled number of tokens of ``x`` (between attention and MLP)."""
        r = self.merges[block]
        if r == 0:
            return x
        ctx = MergeContext(r=r, num_prefix=self.num_prefix, block=block,
                           num_blocks=self.num_blocks,
                           margin=resolve_margin(self.config.margin, block, self.num_blocks),
                           sizes=self.sizes, padding=self.padding,
                           attention=None if attention is None else attention.detach())
        with torch.no_grad():
            plan = self.config.algorithm(metric.detach(), ctx)
        sizes = self.sizes
        if sizes is None:
            sizes = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        x, self.sizes = plan.weighted_mean(x, sizes)
        if self.source is not None:
            self.source = plan.apply(self.source, "amax")
        if self.padding is not None:
            merged = plan.apply(self.padding.unsqueeze(-1).to(torch.uint8), "amax")
            self.padding = merged.squeeze(-1).bool()
        if self.config.keep_plans:
            self.plans[block] = plan
        return x

    def info(self, num_tokens: int) -> MergeInfo:
        return MergeInfo(algo=self.config.algo, token_counts=token_counts(num_tokens, self.merges),
                         merges=list(self.merges), sizes=self.sizes, source=self.source,
                         plans=dict(self.plans))
