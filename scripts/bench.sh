#!/usr/bin/env bash
# Set up .venv and run the main job: `pitome bench` (offline, random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pitome bench "$@"
