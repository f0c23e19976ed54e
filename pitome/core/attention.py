"""Fused attention from projected tokens, and the attention statistics some algorithms need."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_size_bias(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention's additive ``B×1×1×T`` key bias ``log s`` from ``B×T×1`` sizes."""
    return sizes.log().to(dtype).transpose(1, 2).unsqueeze(1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``B×T×C`` as ``B×H×T×(C/H)`` (a view)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        bias: torch.Tensor | None = None, dropout: float = 0.0,
                        scale: float | None = None) -> torch.Tensor:
    """Scaled-dot-product attention of ``B×T×C`` queries, keys and values split into
    ``heads`` heads, with an additive ``B×1×1×T`` key bias; returns ``B×T×C``.

    For adapters whose model's own attention module cannot take the bias: they project
    with the module's own weights and call this (the fused kernel still runs).
    """
    batch, tokens, _ = q.shape
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                         split_heads(v, heads), attn_mask=bias,
                                         dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, -1)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                       num_prefix: int) -> torch.Tensor:
    """``B×T`` attention from the CLS query (or the mean query without one), head-averaged."""
    with torch.no_grad():
        query = q[:, :, :1] if num_prefix > 0 else q.mean(dim=2, keepdim=True)
        logits = (query.float() @ k.float().transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias.float()
        return logits.softmax(dim=-1).mean(dim=1).squeeze(1)
