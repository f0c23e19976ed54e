"""timm's VisionTransformer family: ViT, DeiT (distilled too), DeiT-III, MAE, CLIP-style, registers.

The adapter composes each model's own submodules; it never copies a timm forward. Merging
happens inside each block after the attention residual and before the MLP (ToMe's
placement); the metric is the attention keys averaged over heads, taken from the same qkv
projection that feeds fused attention. Proportional attention adds ``log size`` to each
key's logits (:func:`pitome.kernels.attention.proportional_attention`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from torch.utils.checkpoint import checkpoint

from ..core.attention import received_attention
from ..core.schedule import LinearMargin
from ..kernels.attention import proportional_attention
from ..runtime.patcher import Patch, class_names
from ..runtime.session import Runtime
from ..runtime.state import MergeConfig, MergeState
from .base import UnsupportedModelError

MODEL_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")
BLOCK_CLASSES = ("Block", "ResPostBlock")
ATTENTION_CLASS = "Attention"
RUNTIME_ATTR = "_pitome_runtime"


def attention_with_keys(attn: nn.Module, x: torch.Tensor, state: MergeState,
                        block: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """timm ``Attention`` on ``x``, proportional to the token sizes when the state says so.

    Returns the output, the keys' metric (see :meth:`MergeState.keys_metric`) and, when
    the algorithm asks for it, the attention each token receives from the first prefix
    token (one query row, so the fused kernel still computes the full attention).
    """
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys = state.keys_metric(k, block)
    received = None
    if state.needs_attention:
        received = received_attention(q, k, attn.scale, state.attention_bias(x.dtype),
                                      state.num_prefix)
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        sizes = state.sizes if state.config.prop_attn else None
        out = proportional_attention(q, k, v, sizes, attn.scale, dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        bias = state.attention_bias(x.dtype)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), keys, received


class MergingBlock:
    """Pre-norm ``Block``: attention, residual, merge, MLP."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, merge_state: MergeState | None = None,
                block_index: int = 0) -> torch.Tensor:
        if merge_state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        merge_state.enter(block_index)
        h, keys, received = attention_with_keys(self.attn, self.norm1(x), merge_state,
                                                block_index)
        x = merge_state.merge_residual(x, self.drop_path1(self.ls1(h)), keys, block_index,
                                       received)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MergingResPostBlock:
    """Post-norm ``ResPostBlock``: attention, norm, residual, merge, MLP."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, merge_state: MergeState | None = None,
                block_index: int = 0) -> torch.Tensor:
        if merge_state is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)  # type: ignore[misc]
        merge_state.enter(block_index)
        h, keys, received = attention_with_keys(self.attn, x, merge_state, block_index)
        x = merge_state.merge_residual(x, self.drop_path1(self.norm1(h)), keys, block_index,
                                       received)
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class MergingVisionTransformer:
    """Runs the blocks with one :class:`MergeState` and pools merged tokens by size."""

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        return self._merged_features(x, attn_mask, is_causal)[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x, state = self._merged_features(x, attn_mask, is_causal)
        if self._pools_by_average() and state.sizes is not None:
            return self._size_weighted_head(x, state.sizes)
        return self.forward_head(x)

    def _merged_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None,
                         is_causal: bool) -> tuple[torch.Tensor, MergeState]:
        if attn_mask is not None or is_causal:
            raise ValueError("token merging changes the sequence, so attn_mask and is_causal "
                             "cannot be used on a patched model; call pitome.unpatch first")
        runtime: Runtime = self.__dict__[RUNTIME_ATTR]
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        session = runtime.open()
        completed = False
        try:
            state = session.begin(x)
            checkpointed = self.grad_checkpointing and torch.is_grad_enabled() \
                and not torch.jit.is_scripting()
            for index, block in enumerate(self.blocks):
                if checkpointed:  # timm's set_grad_checkpointing
                    x = checkpoint(block, x, merge_state=state, block_index=index,
                                   use_reentrant=False)
                else:
                    x = block(x, merge_state=state, block_index=index)
            completed = True
        finally:
            runtime.close(session, completed)
        return self.norm(x), state

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            "a merging ViT has fewer tokens than patches after its first merging block, so it "
            "gives no per-patch intermediate features (forward_intermediates, "
            "get_intermediate_layers); call pitome.unpatch(model) for dense features, or map "
            "merged tokens back to patches with pitome.patch(..., trace_source=True) and "
            "pitome.merge_info(model).source")

    def _pools_by_average(self) -> bool:
        return getattr(self, "attn_pool", None) is None and self.global_pool in ("avg", "avgmax")

    def _size_weighted_head(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "pool_include_prefix", False):
            x, sizes = x[:, self.num_prefix_tokens:], sizes[:, self.num_prefix_tokens:]
        pooled = ((x.float() * sizes).sum(dim=1) / sizes.sum(dim=1)).to(x.dtype)
        if self.global_pool == "avgmax":
            pooled = 0.5 * (pooled + x.amax(dim=1))
        return self.head(self.head_drop(self.fc_norm(pooled)))


class TimmVisionTransformerAdapter:
    name = "timm"
    supported = "timm VisionTransformer / VisionTransformerDistilled (ViT, DeiT, DeiT-III, MAE, " \
                "CLIP-style, register tokens) with Block or ResPostBlock blocks"
    default_margin = LinearMargin(0.75, 0.75)

    def matches(self, model: nn.Module) -> bool:
        return bool(class_names(model) & set(MODEL_CLASSES)) and hasattr(model, "blocks")

    def margin_for(self, model: nn.Module) -> LinearMargin:
        return self.default_margin

    def merge_blocks_for(self, model: nn.Module, per_block: bool = False) -> None:
        return None

    def preset_for(self, model: nn.Module, algo: str) -> str:
        return algo

    def check(self, model: nn.Module) -> None:
        for index, block in enumerate(model.blocks):
            names = class_names(block)
            if not names & set(BLOCK_CLASSES):
                raise UnsupportedModelError(
                    f"{type(model).__name__} whose block {index} is a {type(block).__name__} "
                    "(merging needs attention and MLP in sequence)",
                    (self.supported,))
            if ATTENTION_CLASS not in class_names(block.attn):
                raise UnsupportedModelError(
                    f"{type(model).__name__} whose block {index} uses {type(block.attn).__name__}",
                    (self.supported,))

    def patch(self, model: nn.Module, config: MergeConfig) -> Patch:
        self.check(model)
        patch_embed = getattr(model, "patch_embed", None)
        if patch_embed is not None and not getattr(model, "dynamic_img_size", False):
            tokens = patch_embed.num_patches + model.num_prefix_tokens
            config.schedule.plan(tokens, model.num_prefix_tokens, len(model.blocks))
        runtime = Runtime(config, model.num_prefix_tokens, len(model.blocks),
                          model.blocks[0].attn.num_heads)
        if getattr(model, "attn_pool", None) is not None and not config.schedule.is_identity:
            warnings.warn(
                f"{type(model).__name__} pools with attention (global_pool="
                f"{model.global_pool!r}), which weighs each merged token once, not by the "
                "patches it holds; average pooling ('avg') and the class token are size-aware",
                stacklevel=3)
        patch = Patch(self.name, runtime)
        for block in model.blocks:
            patch.swap(block, MergingBlock if "Block" in class_names(block) else MergingResPostBlock)
        patch.swap(model, MergingVisionTransformer)
        patch.set(model, RUNTIME_ATTR, runtime)
        return patch
