"""open_clip's ``VisionTransformer`` (alone or as ``model.visual`` of its CLIP models).

Each ``ResidualAttentionBlock`` is swapped for one that composes the block's own modules
(``ln_1``, ``attn``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``). A block that neither merges nor
needs a key bias calls its ``nn.MultiheadAttention`` unchanged; otherwise it runs fused
scaled-dot-product attention from the same module's input and output projections, which
also yields the keys that the merge measures similarity on. Average pooling weighs each
merged token by its size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import multihead_attention
from ..core.schedule import LinearMargin
from ..core.state import MergeConfig
from .base import CONFIG_ATTR, INFO_ATTR, UnsupportedModelError, class_names, restore_class, \
    swap_class
from .stack import INDEX_ATTR, RUN_ATTR, MergingLayer, StackRun

BLOCK_CLASS = "ResidualAttentionBlock"
SUPPORTED = "open_clip VisionTransformer (open_clip.create_model(...) or its .visual), " \
            "ResidualAttentionBlock blocks, 'tok' or 'avg' pooling"


def _is_open_clip(module: nn.Module) -> bool:
    return any(cls.__module__.split(".")[0] == "open_clip" for cls in type(module).__mro__)


def projected_attention(attention: nn.MultiheadAttention, x: torch.Tensor,
                        bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """Batch-first attention of an ``nn.MultiheadAttention`` with an additive key bias,
    through fused scaled-dot-product attention; returns the output, the keys and queries
    (``B×T×C`` each)."""
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    dropout = attention.dropout if attention.training else 0.0
    out = multihead_attention(q, k, v, attention.num_heads, bias, dropout)
    return attention.out_proj(out), k, q


class MergingResidualAttentionBlock(MergingLayer):
    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("a merging open_clip block takes neither cross-attention inputs "
                             "nor an attention mask; call pitome.unpatch first")
        batch_first = self.attn.batch_first
        x = q_x if batch_first else q_x.transpose(0, 1)
        run, state = self._pitome_enter(x, None)
        index = self.__dict__[INDEX_ATTR]
        bias = state.attention_bias(x.dtype)
        h = self.ln_1(x)
        if bias is None and state.merges[index] == 0:
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h, run.keys, run.queries = projected_attention(self.attn, h, bias)
        x = x + self.ls_1(h)
        if state.merges[index]:
            x = self._pitome_merge(run, x, bias, (self.attn.head_dim) ** -0.5)
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        x = self._pitome_exit(run, x)
        return x if batch_first else x.transpose(0, 1)


class MergingOpenClipVisionTransformer:
    """Average pooling by size: a merged token counts for the patches it holds."""

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sizes = self.__dict__[RUN_ATTR].last_sizes
        if self.pool_type != "avg" or sizes is None or sizes.shape[1] != x.shape[1]:
            return super()._global_pool(x)  # type: ignore[misc]
        weights = sizes[:, 1:].to(torch.float32)
        pooled = (x[:, 1:].float() * weights).sum(dim=1) / weights.sum(dim=1)
        return pooled.to(x.dtype), x[:, 1:]


class OpenClipAdapter:
    name = "open_clip"
    supported = SUPPORTED

    def tower(self, model: nn.Module) -> nn.Module:
        visual = getattr(model, "visual", model)
        if "VisionTransformer" not in class_names(visual) or not hasattr(visual, "transformer"):
            raise UnsupportedModelError(
                f"open_clip {type(model).__name__} whose image tower is a "
                f"{type(visual).__name__}", (SUPPORTED,))
        return visual

    def matches(self, model: nn.Module) -> bool:
        return _is_open_clip(model) and _is_open_clip(getattr(model, "visual", model))

    def margin_for(self, model: nn.Module) -> LinearMargin:
        return LinearMargin(0.9, 0.9)  # the authors' CLIP schedule (SPEC §3)

    def merge_blocks_for(self, model: nn.Module) -> None:
        return None

    def preset_for(self, model: nn.Module, algo: str) -> str:
        return algo

    def patch(self, model: nn.Module, config: MergeConfig) -> None:
        visual = self.tower(model)
        blocks = visual.transformer.resblocks
        for index, block in enumerate(blocks):
            if BLOCK_CLASS not in class_names(block) or hasattr(block, "ln_1_kv"):
                raise UnsupportedModelError(
                    f"open_clip tower whose block {index} is a {type(block).__name__}",
                    (SUPPORTED,))
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModelError("open_clip tower with attentional pooling (CoCa)",
                                        (SUPPORTED,))
        run = StackRun(model, config, 1, blocks[0].attn.num_heads, len(blocks))
        for index, block in enumerate(blocks):
            swap_class(block, MergingResidualAttentionBlock)
            block.__dict__[RUN_ATTR] = run
            block.__dict__[INDEX_ATTR] = index
        swap_class(visual, MergingOpenClipVisionTransformer)
        visual.__dict__[RUN_ATTR] = run
        object.__setattr__(model, CONFIG_ATTR, config)

    def unpatch(self, model: nn.Module) -> None:
        visual = self.tower(model)
        for block in visual.transformer.resblocks:
            restore_class(block)
            block.__dict__.pop(RUN_ATTR, None)
            block.__dict__.pop(INDEX_ATTR, None)
        restore_class(visual)
        visual.__dict__.pop(RUN_ATTR, None)
        for attr in (CONFIG_ATTR, INFO_ATTR):
            model.__dict__.pop(attr, None)
