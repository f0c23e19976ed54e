#!/usr/bin/env bash
# One device call: the GPU tests, then the HF/open_clip throughput grid against its oracles.
# open_clip is not on the device image: its wheels travel in .whl (see docs/performance.md).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-.}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if [ "${TEST_SECONDS:-280}" != 0 ]; then
    timeout "${TEST_SECONDS:-280}" python -m pytest -q -p no:cacheprovider \
        tests/test_gpu.py tests/test_gpu_families.py tests/test_overlap.py tests/test_kernels.py \
        ${TESTS:-} > "$OUT/tests.txt" 2>&1
    echo "tests exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt" | cut -c1-300
fi
if [ "${BENCH:-1}" != 0 ]; then
    python benchmarks/families.py ${MODELS:+--models $MODELS} --json "$OUT/families.json" 2>&1 \
        | tee "$OUT/families.txt"
fi
