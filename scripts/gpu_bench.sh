#!/usr/bin/env bash
# One device call: pitome bench on the GPU for the README and issue notes.
# The device image has torch and timm but no pip access, so run from the source tree.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv
python -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
python -m pitome.cli bench --repeats 20 --warmup 5 --json > "$OUT/bench_vit_base.json"
python -m pitome.cli bench --repeats 20 --warmup 5 --algos none,tome,pitome,pitome_paper,pitome_deit,tome_authors
python -m pitome.cli bench --model vit_small_patch16_224 --repeats 20 --warmup 5
python -m pitome.cli bench --model vit_large_patch16_384 --batch 64 --repeats 10 --warmup 3
