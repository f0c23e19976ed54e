"""Proportional attention on a GPU: which way of adding ``log s`` to the keys is fastest.

``softmax(qkᵀ·scale + log s) v`` equals ``(Σ_j p_ij s_j v_j) / (Σ_j p_ij s_j)`` with ``p`` the
plain softmax, so sizes can also ride in the values: attention without bias over
``v′ = [s·v, s]`` and one division. Compares that with the additive-bias path per backend.

    python benchmarks/prop_attention.py --batch 256 --tokens 178
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pitome.bench import time_forward
from pitome.kernels.attention import proportional_attention


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=178)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = (args.batch, args.heads, args.tokens, args.dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    sizes = torch.randint(1, 8, (args.batch, 1, args.tokens, 1), device=device).float()
    bias = sizes.log().transpose(-1, -2).to(dtype)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                               attn_mask=bias.float())

    def with_backend(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return run

    def sizes_in_values(pad_qk: bool):
        def run():
            extra = args.dim % 8 or 8
            weighted = torch.cat([v * sizes.to(dtype), sizes.to(dtype).expand(*shape[:3], 1),
                                  v.new_zeros(*shape[:3], extra - 1)], dim=-1)
            qq, kk = (F.pad(q, (0, extra)), F.pad(k, (0, extra))) if pad_qk else (q, k)
            out = F.scaled_dot_product_attention(qq, kk, weighted, scale=args.dim ** -0.5)
            return out[..., :args.dim] / out[..., args.dim:args.dim + 1]
        return run

    from torch.nn.attention.flex_attention import flex_attention

    key_bias = bias[:, 0, 0, :]
    compiled_flex = torch.compile(flex_attention)

    def add_key_bias(score, b, h, q_idx, kv_idx):
        return score + key_bias[b, kv_idx]

    def triton_kernel():
        out = proportional_attention(q, k, v, sizes[:, 0], args.dim ** -0.5)
        return out.view(args.batch, args.tokens, args.heads, args.dim).transpose(1, 2)

    candidates = {
        "Triton kernel (pitome)": triton_kernel,
        "flex + score_mod (compiled)": lambda: compiled_flex(q, k, v, score_mod=add_key_bias),
        "flex, no bias (compiled)": lambda: compiled_flex(q, k, v),
        "no bias (floor)": lambda: F.scaled_dot_product_attention(q, k, v),
        "bias, default": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        "bias, efficient": with_backend(SDPBackend.EFFICIENT_ATTENTION),
        "bias, cudnn": with_backend(SDPBackend.CUDNN_ATTENTION),
        "sizes in values, dv != dqk": sizes_in_values(False),
        "sizes in values, padded q/k": sizes_in_values(True),
    }
    for label, run in candidates.items():
        try:
            seconds = time_forward(run, device, 5, 50)
            out = run().float()
        except RuntimeError as error:
            print(f"{label:30s} unavailable: {str(error).splitlines()[0][:80]}")
            continue
        error = ((out - reference).norm() / reference.norm()).item()
        print(f"{label:30s} {seconds * 1e6:7.0f} us   rel. error vs fp32 {error:.1e}")


if __name__ == "__main__":
    main()
