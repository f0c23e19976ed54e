"""Each fused merge operation against its PyTorch twin, on one block's real shapes.

Times the energy score, the bipartite best-partner search, the merge itself (with the
residual add it absorbs) and, for comparison, merging as a batched matmul with the
membership matrix. CUDA events, median of ``--repeats`` calls after warm-up.

    python benchmarks/merge_kernels.py                       # ViT-B/16, batch 256
    python benchmarks/merge_kernels.py --channels 1024 --heads 16 --tokens 577 --batch 64
"""

from __future__ import annotations

import argparse

import torch

from pitome.algorithms.pitome import PiToMe
from pitome.algorithms.tome import ToMe
from pitome.bench import time_forward
from pitome.core.registry import MergeContext
from pitome.core.schedule import TokenSchedule
from pitome.kernels import best_partner, kernel_backend, merge_tokens, token_energy


def membership_merge(plan, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The size-weighted merge as one batched matmul with the ``B×K×T`` membership matrix."""
    weights = plan.membership().to(x.dtype) * sizes.transpose(1, 2).to(x.dtype)
    return (weights @ x) / weights.sum(dim=-1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--channels", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times CUDA kernels; run it on a GPU")

    device, dtype = torch.device("cuda"), torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)
    b, t, c, d = args.batch, args.tokens, args.channels, args.channels // args.heads

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    keys, x, residual = randn(b, t, d), randn(b, t, c), randn(b, t, c)
    sizes = torch.randint(1, 4, (b, t, 1), generator=generator, device=device).float()
    r = TokenSchedule(ratio=args.ratio).plan(t, 1, 12)[0]
    ctx = MergeContext(r=r, num_prefix=1, block=6, num_blocks=12, margin=0.5, sizes=sizes)
    half = (t - 1) // 2
    a_idx = torch.arange(0, 2 * half, 2, device=device).expand(b, -1)
    b_idx = torch.arange(1, 2 * half, 2, device=device).expand(b, -1)
    plan = ToMe()(keys, ctx)

    cases = {
        "energy score (PiToMe)": lambda: token_energy(keys[:, 1:], 0.5),
        "best partner (bipartite)": lambda: best_partner(keys[:, 1:], a_idx, b_idx),
        "merge + residual add": lambda: merge_tokens(plan, x, sizes, residual),
        "ToMe plan": lambda: ToMe()(keys, ctx),
        "PiToMe plan": lambda: PiToMe()(keys, ctx),
    }
    print(f"batch {b}, {t} tokens, {c} channels, head dim {d}, r = {r}; {torch.cuda.get_device_name()}")
    print("| operation | PyTorch µs | Triton µs | speedup |\n|---|---|---|---|")
    for name, run in cases.items():
        timings = []
        for backend in ("torch", "triton"):
            with kernel_backend(backend), torch.inference_mode():
                timings.append(time_forward(run, device, warmup=5, repeats=args.repeats) * 1e6)
        print(f"| {name} | {timings[0]:.1f} | {timings[1]:.1f} | {timings[0] / timings[1]:.2f}x |",
              flush=True)
    with torch.inference_mode():
        matmul = time_forward(lambda: membership_merge(plan, x + residual, sizes), device,
                              warmup=5, repeats=args.repeats) * 1e6
    print(f"| merge + residual add as a membership matmul | {matmul:.1f} | - | - |")


if __name__ == "__main__":
    main()
