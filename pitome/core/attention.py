"""Attention statistics some algorithms need, computed beside the fused attention kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .state import MergeState


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                       state: "MergeState") -> torch.Tensor:
    """``B×T`` attention from the CLS query (or the mean query without one), head-averaged."""
    with torch.no_grad():
        query = q[:, :, :1] if state.num_prefix > 0 else q.mean(dim=2, keepdim=True)
        logits = (query.float() @ k.float().transpose(-2, -1)) * scale
        if bias is not None:
            logits = logits + bias.float()
        return logits.softmax(dim=-1).mean(dim=1).squeeze(1)
