"""Merged models exported to ONNX and run in onnxruntime: agreement with PyTorch and speed.

Each variant (unmerged, PiToMe, ToMe at ``--ratio``) is exported once with a dynamic batch
through the dynamo exporter, checked against the PyTorch model at batch 1 and ``--batch``,
then timed in onnxruntime on the CPU, the variants taking turns over ``--rounds``.

    python benchmarks/onnx_speed.py --json docs/onnx-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pitome
from pitome.models import create_timm_model

VARIANTS = ("none", "pitome", "tome")


def export(model: torch.nn.Module, path: Path, batch: int) -> None:
    example = torch.randn(batch, 3, *model.patch_embed.img_size)
    dims = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    program = torch.onnx.export(model, (example,), dynamic_shapes=dims, dynamo=True,
                                verbose=False)
    program.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="write the rows here (refuses to overwrite)")
    args = parser.parse_args()
    if args.json and Path(args.json).exists():
        sys.exit(f"{args.json} exists; give another --json path")
    import onnxruntime

    model = create_timm_model(args.model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions, errors = {}, {}
    checks = [torch.randn(size, 3, *model.patch_embed.img_size,
                          generator=torch.Generator().manual_seed(size))
              for size in (1, args.batch)]
    with tempfile.TemporaryDirectory() as folder:
        for variant in VARIANTS:
            pitome.unpatch(model)
            if variant != "none":
                pitome.patch(model, algo=variant, ratio=args.ratio)
            print(f"exporting {variant} ...", file=sys.stderr, flush=True)
            path = Path(folder) / f"{variant}.onnx"
            export(model, path, 2)
            session = onnxruntime.InferenceSession(str(path), options,
                                                   providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            with torch.no_grad():
                errors[variant] = max(
                    float(np.abs(session.run(None, {name: x.numpy()})[0]
                                 - model(x).numpy()).max()) for x in checks)
            sessions[variant] = (session, name)
    x = checks[1].numpy()
    timings: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant, (session, name) in sessions.items():
            session.run(None, {name: x})
            start = time.perf_counter()
            for _ in range(args.repeats):
                session.run(None, {name: x})
            timings[variant].append((time.perf_counter() - start) / args.repeats)
    base = statistics.median(timings["none"])
    rows = [{"variant": v, "ratio": 1.0 if v == "none" else args.ratio, "batch": args.batch,
             "ms": statistics.median(timings[v]) * 1e3,
             "speedup": base / statistics.median(timings[v]), "max_abs_error": errors[v]}
            for v in VARIANTS]
    print(f"{args.model} in onnxruntime {onnxruntime.__version__} (CPU, {args.threads} threads), "
          f"batch {args.batch}, exported with a dynamic batch; error = max |ONNX - PyTorch| "
          "at batch 1 and the timed batch")
    print(f"{'variant':8} {'ratio':>5} {'ms':>8} {'speedup':>8} {'error':>9}")
    for row in rows:
        print(f"{row['variant']:8} {row['ratio']:>5g} {row['ms']:8.1f} {row['speedup']:7.2f}x "
              f"{row['max_abs_error']:9.2e}")
    if args.json:
        environment = {"python": platform.python_version(), "torch": torch.__version__,
                       "onnxruntime": onnxruntime.__version__, "cpu": platform.processor()
                       or platform.machine(), "threads": args.threads, "model": args.model}
        Path(args.json).write_text(json.dumps({"environment": environment, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
