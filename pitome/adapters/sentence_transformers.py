"""sentence-transformers: a ``SentenceTransformer`` whose first module wraps a supported
Hugging Face text encoder (BERT, RoBERTa, DistilBERT; e.g. all-MiniLM-L6-v2).

The encoder is patched as a Hugging Face model. Its module then hands the next ones the
merged tokens with a mask that fits them (real merged tokens 1, padding 0) and each token's
weight (the input tokens it holds), so ``Pooling`` gives the mean over the sentence's real
input tokens, its first token or the max over its real tokens, and
``encode(output_value="token_embeddings")`` returns the real merged tokens only. A
sentence's embedding does not depend on its batch-mates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..runtime.patcher import Patch, class_names
from ..runtime.session import Runtime
from ..runtime.state import MergeConfig
from .base import UnsupportedModelError
from .hf import HuggingFaceAdapter

WEIGHTS = "pitome_token_weights"  # B×T: input tokens each merged token holds (0: padding)
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
SUPPORTED = ("sentence-transformers SentenceTransformer over a Hugging Face BERT, RoBERTa or "
             f"DistilBERT Transformer module, pooling by {', '.join(POOLING_MODES)}")


def _encoder(module: nn.Module) -> nn.Module | None:
    """The Hugging Face model inside a sentence-transformers ``Transformer`` module."""
    return getattr(module, "auto_model", None) or getattr(module, "model", None)


class MergedFeatures:
    """A forward hook on the encoder's module: merged tokens leave it with a mask and weights
    that fit them. (sentence-transformers' modules refuse a class swap, so hooks it is.)"""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def __call__(self, module: nn.Module, args: Any, features: dict[str, Any]) -> dict[str, Any]:
        info = self.runtime.info()
        tokens = features["token_embeddings"]
        if info is None or info.sizes is None or info.sizes.shape[:2] != tokens.shape[:2]:
            return features  # nothing merged: the tokenizer's mask still fits
        real = info.padding if info.padding is not None else \
            torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        features["attention_mask"] = real.to(features["attention_mask"].dtype)
        features[WEIGHTS] = info.sizes[..., 0] * real
        return features


def size_weighted_pooling(pooling: nn.Module, args: Any, features: dict[str, Any]
                          ) -> dict[str, Any]:
    """A forward hook on ``Pooling``: over merged tokens, a merged token counts for the input
    tokens it holds (mean), padding never counts (mean, max), the first token is CLS."""
    weights = features.get(WEIGHTS)
    if weights is None:
        return features
    tokens = features["token_embeddings"]
    real = features["attention_mask"].bool()
    weighted = (tokens.float() * weights.unsqueeze(-1)).sum(dim=1)
    total = weights.sum(dim=1, keepdim=True).clamp_min(1e-9)
    vectors = []
    for mode in _modes(pooling):
        if mode == "cls":
            vectors.append(tokens[:, 0])
        elif mode == "max":
            vectors.append(tokens.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(dim=1))
        elif mode == "mean":
            vectors.append((weighted / total).to(tokens.dtype))
        else:  # mean_sqrt_len_tokens
            vectors.append((weighted / total.sqrt()).to(tokens.dtype))
    features["sentence_embedding"] = torch.cat(vectors, dim=1)
    return features


def _modes(pooling: nn.Module) -> tuple[str, ...]:
    mode = pooling.pooling_mode
    return (mode,) if isinstance(mode, str) else tuple(mode)


class SentenceTransformersAdapter:
    name = "sentence-transformers"
    supported = SUPPORTED

    def __init__(self) -> None:
        self.hf = HuggingFaceAdapter()

    def matches(self, model: nn.Module) -> bool:
        return "SentenceTransformer" in class_names(model)

    def _parts(self, model: nn.Module) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        modules = list(model.children())
        first = modules[0] if modules else None
        encoder = None if first is None else _encoder(first)
        if encoder is None or not self.hf.matches(encoder):
            raise UnsupportedModelError(
                f"SentenceTransformer whose first module is a {type(first).__name__} over a "
                f"{type(encoder).__name__}", (SUPPORTED,))
        poolings = [m for m in modules[1:] if "Pooling" in class_names(m)]
        for pooling in poolings:
            unsupported = [m for m in _modes(pooling) if m not in POOLING_MODES]
            if unsupported or not getattr(pooling, "include_prompt", True):
                raise UnsupportedModelError(
                    f"SentenceTransformer pooling by {unsupported or 'mean without the prompt'}",
                    (SUPPORTED,))
        return first, encoder, poolings

    def encoder(self, model: nn.Module) -> nn.Module:
        """The Hugging Face model inside ``model``'s first module (the one that merges)."""
        return self._parts(model)[1]

    def margin_for(self, model: nn.Module):
        return self.hf.margin_for(self._parts(model)[1])

    def merge_blocks_for(self, model: nn.Module,
                         per_block: bool = False) -> tuple[int, ...] | None:
        return self.hf.merge_blocks_for(self._parts(model)[1], per_block)

    def preset_for(self, model: nn.Module, algo: str) -> str:
        return self.hf.preset_for(self._parts(model)[1], algo)

    def patch(self, model: nn.Module, config: MergeConfig) -> Patch:
        module, encoder, poolings = self._parts(model)
        inner = self.hf.patch(encoder, config)
        runtime: Runtime = inner.runtime
        patch = Patch(self.name, runtime)
        patch.swapped, patch.hooks, patch.attributes = inner.swapped, inner.hooks, inner.attributes
        patch.hook(module.register_forward_hook(MergedFeatures(runtime)))
        for pooling in poolings:
            patch.hook(pooling.register_forward_hook(size_weighted_pooling))
        return patch
