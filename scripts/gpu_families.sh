#!/usr/bin/env bash
# One device call: the HF/open_clip throughput grid against its oracles, then the GPU tests.
# open_clip is not on the device image: its wheels travel in .whl (see docs/performance.md).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python benchmarks/families.py --json "${OUT:-.}/families.json" 2>&1 | tee "${OUT:-.}/families.txt"
timeout "${TEST_SECONDS:-280}" python -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_overlap.py tests/test_contract.py tests/test_kernels.py 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | cut -c1-400 | head -40
