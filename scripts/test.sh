#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# -n auto: one pytest-xdist worker per core; --dist loadgroup keeps tests that share an export on one worker
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -n auto --dist loadgroup "$@"
