"""Where the time of a merged ViT goes on a GPU: oracle, variants, and a kernel profile.

The oracle runs the same token schedule with zero merge cost (it keeps the first ``n``
tokens after each attention): the physical limit of that schedule (docs/method.md §9).

    python benchmarks/gpu_profile.py --model vit_base_patch16_224 --batch 256
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import pitome
from pitome.bench import oracle_forward, time_forward
from pitome.core.schedule import TokenSchedule, token_counts
from pitome.models import create_timm_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--profile", nargs="*", default=["none", "tome"])
    args = parser.parse_args()

    device, dtype = torch.device("cuda"), torch.bfloat16
    model = create_timm_model(args.model).to(device, dtype)
    x = torch.randn(args.batch, 3, *model.patch_embed.img_size, device=device, dtype=dtype)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    counts = token_counts(tokens, TokenSchedule(ratio=args.ratio).plan(
        tokens, model.num_prefix_tokens, len(model.blocks)))

    variants = {
        "none": dict(),
        "oracle": "oracle",
        "tome": dict(algo="tome"),
        "tome_noprop": dict(algo="tome", prop_attn=False),
        "pitome": dict(algo="pitome"),
        "pitome_noprop": dict(algo="pitome", prop_attn=False),
        "pitome_paper": dict(algo="pitome_paper"),
    }
    results = {}
    for name, spec in variants.items():
        pitome.unpatch(model)
        if spec == "oracle":
            run_model = oracle_forward(model, counts)
        else:
            if spec:
                pitome.patch(model, ratio=args.ratio, **spec)
            run_model = model
        if args.compile:
            run_model = torch.compile(run_model)

        def run():
            with torch.inference_mode():
                run_model(x)

        seconds = time_forward(run, device, warmup=5, repeats=30)
        results[name] = seconds
        print(f"{name:14s} {args.batch / seconds:9.1f} img/s  "
              f"{results['none'] / seconds:5.2f}x", flush=True)

        if name in args.profile:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22,
                                            max_name_column_width=70))
    pitome.unpatch(model)

    # Proportional attention: an additive key bias, or log-sizes folded into one extra
    # (padded) head dimension so the flash kernel still applies.
    heads, tokens, dim = 12, 178, 64
    q, k, v = (torch.randn(args.batch, heads, tokens, dim, device=device, dtype=dtype)
               for _ in range(3))
    log_sizes = torch.rand(args.batch, 1, tokens, 1, device=device).log1p()
    bias = log_sizes.transpose(-1, -2).to(dtype)

    def folded():
        pad = 8
        scale = dim ** -0.5
        ones = torch.zeros(args.batch, heads, tokens, pad, device=device, dtype=dtype)
        ones[..., 0] = 1.0
        extra_k = torch.zeros_like(ones)
        extra_k[..., :1] = (log_sizes / scale).to(dtype)
        out = F.scaled_dot_product_attention(torch.cat([q, ones], -1), torch.cat([k, extra_k], -1),
                                             F.pad(v, (0, pad)), scale=scale)
        return out[..., :dim]

    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                               attn_mask=bias.float())
    for label, run in (("no bias", lambda: F.scaled_dot_product_attention(q, k, v)),
                       ("key bias", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)),
                       ("folded", folded)):
        seconds = time_forward(run, device, 5, 50)
        error = ((run().float() - reference).norm() / reference.norm()).item()
        print(f"sdpa {label:9s}: {seconds * 1e6:6.0f} us  rel. error vs fp32 biased {error:.1e}")


if __name__ == "__main__":
    main()
