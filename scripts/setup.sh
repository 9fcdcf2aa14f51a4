#!/usr/bin/env bash
# Create .venv (if missing) and install tokenfuse with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# TensorRT's public C++ headers for building the C++ example and the plugin without TensorRT
# installed (kernel-lens ships TensorRT 10.14's headers; its own dependencies are not needed).
.venv/bin/python -m pip install --quiet --no-deps kernel-lens==2.0.1
