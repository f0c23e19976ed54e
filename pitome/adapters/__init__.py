"""Model-family adapters, tried in order; each recognises models by class name."""

from __future__ import annotations

from torch import nn

from .base import Adapter, UnsupportedModelError
from .hf import HuggingFaceAdapter
from .open_clip import OpenClipAdapter
from .sentence_transformers import SentenceTransformersAdapter
from .timm_vit import TimmVisionTransformerAdapter

ADAPTERS: list[Adapter] = [TimmVisionTransformerAdapter(), HuggingFaceAdapter(),
                           OpenClipAdapter(), SentenceTransformersAdapter()]


def supported_models() -> list[str]:
    """One line per supported model family."""
    return [adapter.supported for adapter in ADAPTERS]


def find_adapter(model: nn.Module) -> Adapter:
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(type(model).__name__, supported_models())
