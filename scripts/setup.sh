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
# The plugin build needs CMake and nvcc: where the system has none, the PyPI wheels (cmake;
# nvidia-cuda-nvcc with the CUDA runtime and CCCL headers and libraries) go into .venv, where
# tokenfuse.plugins finds them (nvcc under nvidia/cu13/bin).
if ! command -v cmake >/dev/null && [ ! -x .venv/bin/cmake ]; then
  .venv/bin/python -m pip install --quiet cmake
fi
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  .venv/bin/python -m pip install --quiet nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl
fi
