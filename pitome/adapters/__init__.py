"""Model-family adapters, tried in order; each recognises models by class name."""

from __future__ import annotations

from torch import nn

from .base import Adapter, UnsupportedModelError
from ..runtime.patcher import class_names
from .hf import HuggingFaceAdapter
from .llava import LLAVA_NEXT_REFUSAL
from .open_clip import OpenClipAdapter
from .sentence_transformers import SentenceTransformersAdapter
from .timm_vit import TimmVisionTransformerAdapter

ADAPTERS: list[Adapter] = [TimmVisionTransformerAdapter(), HuggingFaceAdapter(),
                           OpenClipAdapter(), SentenceTransformersAdapter()]


def supported_models() -> list[str]:
    """One line per supported model family."""
    return [adapter.supported for adapter in ADAPTERS]


def find_adapter(model: nn.Module) -> Adapter:
    if "LlavaNextForConditionalGeneration" in class_names(model):
        raise UnsupportedModelError(LLAVA_NEXT_REFUSAL, supported_models())
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UnsupportedModelError(type(model).__name__, supported_models())
