#!/usr/bin/env bash
# Here (no GPU): fetch what the GPU machine lacks and pack it into .gpu/call1 ... .gpu/call7, each
# under the device tool's 64 MiB a call (docs/gpu-runbook.md says which call carries which folder).
#   onnxruntime-gpu 1.31.1 (cp312, CUDA 13; 255 MB, in five pieces), TensorRT-RTX 1.7.1 (libs 95 MB,
#   in two pieces; bindings; the tensorrt_rtx module), onnx-graphsurgeon, polygraphy, Fashion-MNIST.
# .gpu/ is ignored through .git/info/exclude. Run from the repository root: bash scripts/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
mkdir -p .gpu/whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .gpu/whl \
    onnxruntime-gpu==1.31.1 tensorrt-rtx-cu13-bindings==1.7.1.116 tensorrt-rtx-cu13-libs==1.7.1.116 onnx-graphsurgeon==0.6.1 polygraphy==0.53.6
ls .gpu/whl/tensorrt_rtx_cu13-1.7.1.116-*.whl >/dev/null 2>&1 || "$python" -m pip wheel -q --no-deps -w .gpu/whl tensorrt-rtx-cu13==1.7.1.116

rm -rf .gpu/call* .gpu/pieces && mkdir -p .gpu/pieces
split -b 60m -d .gpu/whl/onnxruntime_gpu-*.whl .gpu/pieces/ort.
split -b 60m -d .gpu/whl/tensorrt_rtx_cu13_libs-*.whl .gpu/pieces/trtlibs.
for i in 1 2 3 4 5 6 7; do mkdir -p .gpu/call$i; done
mv .gpu/pieces/ort.00 .gpu/call1/; mv .gpu/pieces/ort.01 .gpu/call2/; mv .gpu/pieces/ort.02 .gpu/call3/
mv .gpu/pieces/trtlibs.00 .gpu/call4/
mv .gpu/pieces/ort.03 .gpu/call5/
mv .gpu/pieces/ort.04 .gpu/pieces/trtlibs.01 .gpu/call6/
cp .gpu/whl/onnx_graphsurgeon-*.whl .gpu/whl/polygraphy-*.whl .gpu/whl/tensorrt_rtx_cu13-*.whl .gpu/whl/tensorrt_rtx_cu13_bindings-*.whl .gpu/call6/
( cd .gpu/whl && sha256sum onnxruntime_gpu-*.whl tensorrt_rtx_cu13_libs-*.whl ) > .gpu/call6/SHA256SUMS
if ls /usr/share/datasets/fashion-mnist/*.gz >/dev/null 2>&1; then  # Debian's dataset-fashion-mnist, for the training step
  cp /usr/share/datasets/fashion-mnist/*.gz .gpu/call7/
else
  echo "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): call 7 carries no training data"
fi
rmdir .gpu/pieces
du -sh .gpu/call*
