"""Registered merging methods. Importing this module fills the registry."""

from __future__ import annotations

import math

from ..core.registry import register
from .pitome import Hybrid, PiToMe, authors_deit, authors_mae, tome_then_pitome
from .crossget import CrossGET
from .dct import DCT
from .diffrate import DiffRate
from .floors import AttentionPruning, RandomMatching
from .mctf import MCTF
from .tofu import ToFu
from .tome import ToMe
from .visionzip import VisionZip

register("pitome", tome_then_pitome, "the default: ToMe matching in the first half of the blocks, "
         "PiToMe after, proportional attention (chosen by measurement, docs/defaults.md)",
         defaults={"prop_attn": True})
register("pitome_paper", PiToMe, "PiToMe as the paper states it: energy-protected, all of set A "
         "merges, every block (docs/method.md §3-4)", defaults={"prop_attn": False}, pool=1.0)
register("pitome_deit", authors_deit, "the PiToMe authors' DeiT setting: BSM-PiToMe in the first "
         "half of the blocks, PiToMe after (docs/method.md §5)", defaults={"prop_attn": False})
register("pitome_mae", authors_mae, "the PiToMe authors' MAE setting: PiToMe in the first half of "
         "the blocks, BSM-PiToMe after (docs/method.md §5)", defaults={"prop_attn": False})
register("bsm_pitome", PiToMe, "the authors' BSM-PiToMe: energy-ordered A/B split over all tokens, "
         "ToMe's top-r edges, nothing protected", defaults={"prop_attn": False}, pool=math.inf)
register("pitome_text", PiToMe, "PiToMe for text: Gaussian energy, contiguous A/B split "
         "(the reference text code)", defaults={"prop_attn": False}, energy="gaussian",
         split="contiguous")
register("tome", ToMe, "ToMe: bipartite soft matching, A/B by position over non-prefix tokens, "
         "proportional attention", defaults={"prop_attn": True})
register("tome_authors", ToMe, "ToMe as the PiToMe authors ran it: r counted over all tokens and "
         "CLS in set A", defaults={"prop_attn": True, "count_prefix": True}, prefix_parity=True)

register("tofu", ToFu, "ToFu (Kim et al. 2024): ToMe matching; prune in the first quarter of "
         "the blocks, norm-preserving MLERP merging after", defaults={"prop_attn": True})
register("dct", DCT, "DCT (Fourier Transformer, He et al. 2023): keep the lowest frequencies of "
         "the token sequence; no sources", defaults={"prop_attn": False})
register("diffrate", DiffRate, "DiffRate (Chen et al. 2023) with rates fixed from the ratio: the "
         "least CLS-attended tokens merge into their most similar kept token",
         defaults={"prop_attn": True})
register("mctf", MCTF, "MCTF (Lee et al. 2024): bidirectional fusion weighted by similarity, "
         "informativeness and size; attention-weighted pooling", defaults={"prop_attn": True})
register("crossget", CrossGET, "CrossGET (Shi et al. 2024) complete-graph soft matching, vision "
         "tower only: strongest matches merge into their best non-source token",
         defaults={"prop_attn": True})
register("visionzip", VisionZip, "VisionZip (Yang et al. 2025), vision towers: keep the most "
         "CLS-attended tokens, merge the rest into a few contextual tokens, once, in the last "
         "merging block", defaults={"prop_attn": False})
register("random", RandomMatching, "floor: r random tokens merge into random partners",
         defaults={"prop_attn": True})
register("prune", AttentionPruning, "floor: drop the r tokens with the least CLS attention "
         "(EViT without fusion)", defaults={"prop_attn": False})

__all__ = ["DCT", "MCTF", "AttentionPruning", "CrossGET", "DiffRate", "Hybrid", "PiToMe",
           "RandomMatching", "ToFu", "ToMe", "VisionZip"]
