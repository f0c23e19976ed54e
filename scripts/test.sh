#!/usr/bin/env bash
# Set up .venv and run the test suite (tests needing ../shared skip with a reason without it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow" -rs -n "${PYTEST_WORKERS:-auto}" --durations=20 "$@"
