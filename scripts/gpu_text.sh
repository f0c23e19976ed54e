#!/usr/bin/env bash
# One device call: the text GPU tests, then benchmarks/text.py (ARGS, default --quick).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-.}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if [ "${TEST_SECONDS:-200}" != 0 ]; then
    timeout "${TEST_SECONDS:-200}" python -m pytest -q -p no:cacheprovider \
        tests/test_packed_text.py tests/test_sentence_transformers.py tests/test_text_bench.py \
        ${TESTS:-} > "$OUT/text-tests.txt" 2>&1
    echo "tests exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/text-tests.txt" | cut -c1-300
fi
if [ "${BENCH:-1}" != 0 ]; then
    python benchmarks/text.py ${ARGS:---quick} --json "$OUT/text.json" 2>"$OUT/text-progress.txt" \
        | tee "$OUT/text.txt"
    tail -3 "$OUT/text-progress.txt"
fi
