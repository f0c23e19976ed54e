"""LLaVA helpers of the public API: image-token counts and placeholder fitting for a
(patched or unpatched) ``LlavaForConditionalGeneration``."""

from .adapters.llava import fit_image_placeholders, image_tokens, unmerged_image_tokens

__all__ = ["fit_image_placeholders", "image_tokens", "unmerged_image_tokens"]
