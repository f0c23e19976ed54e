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

from ..core.attention import multihead_attention, split_heads
from ..core.schedule import LinearMargin
from ..kernels.attention import proportional_attention
from ..runtime.layers import INDEX_ATTR, RUNTIME_ATTR, MergingLayer
from ..runtime.patcher import Patch, class_names
from ..runtime.session import Runtime, Session
from ..runtime.state import MergeConfig
from .base import UnsupportedModelError

STACK_ATTR = "_pitome_stack"

BLOCK_CLASS = "ResidualAttentionBlock"
SUPPORTED = "open_clip VisionTransformer (open_clip.create_model(...) or its .visual), " \
            "ResidualAttentionBlock blocks, 'tok' or 'avg' pooling"


def _is_open_clip(module: nn.Module) -> bool:
    return any(cls.__module__.split(".")[0] == "open_clip" for cls in type(module).__mro__)


def projected_attention(attention: nn.MultiheadAttention, x: torch.Tensor,
                        session: Session) -> torch.Tensor:
    """Batch-first attention of an ``nn.MultiheadAttention`` with the session's key bias,
    through fused scaled-dot-product attention. The keys and queries go to the session as
    soon as they exist, so the block's plan can start before the attention."""
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    session.queries = q
    session.hand_keys(k)
    state = session.state
    dropout = attention.dropout if attention.training else 0.0
    heads = attention.num_heads
    if state.padding is None:  # proportional attention in the fused kernel where it runs
        sizes = state.sizes if state.config.prop_attn else None
        out = proportional_attention(split_heads(q, heads), split_heads(k, heads),
                                     split_heads(v, heads), sizes, attention.head_dim ** -0.5,
                                     dropout)
    else:
        out = multihead_attention(q, k, v, heads, state.attention_bias(x.dtype), dropout)
    return attention.out_proj(out)


class MergingResidualAttentionBlock(MergingLayer):
    def _pitome_layer(self, session: Session, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                      v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("a merging open_clip block takes neither cross-attention inputs "
                             "nor an attention mask; call pitome.unpatch first")
        batch_first = self.attn.batch_first
        x = q_x if batch_first else q_x.transpose(0, 1)
        state = self._pitome_state(session, x, None)
        merges = state.merges[self.__dict__[INDEX_ATTR]]
        h = self.ln_1(x)
        if not state.biased and not merges:
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h = projected_attention(self.attn, h, session)
        x = self._pitome_merge(session, x, None, self.attn.head_dim ** -0.5, self.ls_1(h))
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x if batch_first else x.transpose(0, 1)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.__dict__[STACK_ATTR].grad_checkpointing


class MergingTransformer:
    """open_clip's block loop without its own checkpointing: merging blocks checkpoint
    themselves (see :mod:`pitome.runtime.layers`), so a recomputation finds its session."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1).contiguous()
        try:
            for block in self.resblocks:
                x = block(x, attn_mask=attn_mask)
        finally:
            self.__dict__[RUNTIME_ATTR].end_forward(self, None, None)
        return x if self.batch_first else x.transpose(0, 1)


class MergingOpenClipVisionTransformer:
    """Average pooling by size: a merged token counts for the patches it holds."""

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        info = self.__dict__[RUNTIME_ATTR].info()
        sizes = None if info is None else info.sizes
        if self.pool_type != "avg" or sizes is None or sizes.shape[:2] != x.shape[:2]:
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
        return LinearMargin(0.9, 0.9)  # the authors' CLIP schedule (docs/method.md §3)

    def merge_blocks_for(self, model: nn.Module, per_block: bool = False) -> None:
        return None

    def preset_for(self, model: nn.Module, algo: str) -> str:
        return algo

    def patch(self, model: nn.Module, config: MergeConfig) -> Patch:
        visual = self.tower(model)
        transformer = visual.transformer
        blocks = transformer.resblocks
        for index, block in enumerate(blocks):
            if BLOCK_CLASS not in class_names(block) or hasattr(block, "ln_1_kv"):
                raise UnsupportedModelError(
                    f"open_clip tower whose block {index} is a {type(block).__name__}",
                    (SUPPORTED,))
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModelError("open_clip tower with attentional pooling (CoCa)",
                                        (SUPPORTED,))
        runtime = Runtime(config, 1, len(blocks), blocks[0].attn.num_heads)
        patch = Patch(self.name, runtime)
        for index, block in enumerate(blocks):
            patch.swap(block, MergingResidualAttentionBlock)
            patch.set(block, RUNTIME_ATTR, runtime)
            patch.set(block, INDEX_ATTR, index)
            patch.set(block, STACK_ATTR, transformer)
        patch.swap(transformer, MergingTransformer)
        patch.set(transformer, RUNTIME_ATTR, runtime)
        patch.swap(visual, MergingOpenClipVisionTransformer)
        patch.set(visual, RUNTIME_ATTR, runtime)
        return patch
