#!/usr/bin/env bash
# One device call per part (the carried data of both would pass the 64 MiB carry limit):
#   bash scripts/gpu_finetune.sh text     # carry .carry/shared/data/text/sst2 and .carry/minilm
#   bash scripts/gpu_finetune.sh vision   # carry .carry/shared/data/imagenet-sample and
#                                         #       .carry/shared/models/vit_tiny_...safetensors
# Extra arguments go to benchmarks/finetune.py; JSON goes to $OUT (or results/).
set -euo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
part="${1:?usage: scripts/gpu_finetune.sh text|vision [benchmark flags]}"
shift
nvidia-smi --query-gpu=name --format=csv,noheader || true
minilm=()
[[ "$part" == text && -d .carry/minilm ]] && minilm=(--minilm .carry/minilm)
python benchmarks/finetune.py --part "$part" --shared .carry/shared "${minilm[@]}" \
    --out "${OUT:-results}" "$@" 2> >(grep -v -e "it/s\]" -e "step/s" -e "s/step" >&2)
