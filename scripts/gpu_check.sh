#!/usr/bin/env bash
# One device call: GPU tests, then the throughput grid (eager and CUDA graphs), JSON to $OUT.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_plan_reference.py 2>&1 | tail -5
python benchmarks/throughput.py --cuda-graph --json "${OUT:-.}/throughput.json" 2>/dev/null
