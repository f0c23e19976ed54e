"""Fused kernels of the merge path, each with a PyTorch twin that runs where it cannot.

- :func:`token_energy`: PiToMe's energy score without the ``T×T`` similarity in memory;
- :func:`tokens_by_energy`: the tokens ordered by it (two short launches at small batches);
- :func:`best_partner`: bipartite matching's best edge per token without the score matrix;
- :func:`argsort_rows`: stable argsort of many short rows (score and energy orders);
- :func:`merge_tokens`: a merge plan applied to the features, fused with the residual add;
- :func:`proportional_attention`: flash attention with each key's ``log s`` bias.

The Triton kernels run on CUDA tensors when Triton is installed; :func:`kernel_backend` and
the ``PITOME_KERNELS`` environment variable choose otherwise (see :mod:`.backend`).
"""

from .attention import proportional_attention
from .backend import Backend, kernel_backend, triton_available, use_triton
from .energy import token_energy, tokens_by_energy
from .merge import merge_tokens, sources_by_destination
from .partner import best_partner, pair_scores
from .sort import argsort_rows

__all__ = ["Backend", "argsort_rows", "best_partner", "kernel_backend", "merge_tokens",
           "pair_scores", "proportional_attention", "sources_by_destination", "token_energy",
           "tokens_by_energy", "triton_available", "use_triton"]
