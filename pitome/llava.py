"""LLaVA helpers of the public API for a (patched or unpatched)
``LlavaForConditionalGeneration``: image-token counts, placeholder fitting (a patched model
does it itself), static-cache sizing, and the vision tower replayed as CUDA graphs."""

from torch import nn

from .adapters.llava import (fit_image_placeholders, forget_static_cache, image_tokens,
                             unmerged_image_tokens)
from .cuda_graph import capture_forward, release_forward

__all__ = ["capture_vision_tower", "fit_image_placeholders", "forget_static_cache",
           "image_tokens", "release_vision_tower", "unmerged_image_tokens"]


def vision_tower(model: nn.Module) -> nn.Module:
    """The CLIP tower of a ``LlavaForConditionalGeneration`` (``model.model.vision_tower`` in
    transformers 5, ``model.vision_tower`` before)."""
    inner = getattr(model, "model", None)
    tower = getattr(inner, "vision_tower", None) or getattr(model, "vision_tower", None)
    if not isinstance(tower, nn.Module):
        raise TypeError(f"{type(model).__name__} has no vision_tower: pass a "
                        "LlavaForConditionalGeneration")
    return tower


def capture_vision_tower(model: nn.Module, max_graphs: int = 4) -> nn.Module:
    """Run ``model``'s vision tower as CUDA graphs, one per batch shape of images
    (:class:`pitome.cuda_graph.ShapeGraphs`); returns ``model``.

    A merged tower launches a few small kernels per merging block, so in eager mode its
    time to the first token is the host's launching, not the GPU's work; replaying it
    leaves the prefill of the language model as the first token's cost. Calls with
    gradients, in training mode or on a CPU run eagerly; patching again captures anew.
    :func:`release_vision_tower` undoes it.
    """
    capture_forward(vision_tower(model), owner=model, max_graphs=max_graphs)
    return model


def release_vision_tower(model: nn.Module) -> nn.Module:
    """Undo :func:`capture_vision_tower`; returns ``model``."""
    release_forward(vision_tower(model))
    return model
