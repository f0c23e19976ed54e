"""LLaVA helpers of the public API: image-token counts, placeholder fitting (a patched model
does it itself) and static-cache sizing for a (patched or unpatched)
``LlavaForConditionalGeneration``."""

from .adapters.llava import (fit_image_placeholders, forget_static_cache, image_tokens,
                             unmerged_image_tokens)

__all__ = ["fit_image_placeholders", "forget_static_cache", "image_tokens",
           "unmerged_image_tokens"]
