#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root: keep this call's carried pieces, then
# run one of the later GPU steps that need carried wheels or data, writing under $OUT (the kernels
# and the PyTorch models are scripts/gpu_check.sh's one call). docs/gpu-runbook.md gives the order.
#   bash scripts/gpu_call.sh CALL_FOLDER STEP     STEP: ort | trt | train | none
# Environment: DTYPES (ort), EPOCHS (train).
set -uo pipefail
carried=${1:?a carried folder, e.g. .gpu/call1}
step=${2:?a step}
out=${OUT:-/tmp/out}
mkdir -p /tmp/carry /tmp/wheels /tmp/site "$out"
[ -d "$carried" ] && cp -n "$carried"/* /tmp/carry/ 2>/dev/null
echo "carried so far: $(ls /tmp/carry | tr '\n' ' ')"

# tokenfuse from this checkout, without installing it (its directory is the package)
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/tokenfuse
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

join_wheels() {  # the pieces back into wheels, checked against the sums made beside them
  [ -f /tmp/carry/SHA256SUMS ] || { echo "SHA256SUMS not carried yet (call6)"; return 1; }
  while read -r sum name; do
    case $name in onnxruntime_gpu-*) prefix=ort ;; tensorrt_rtx_cu13_libs-*) prefix=trtlibs ;; *) continue ;; esac
    cat /tmp/carry/$prefix.* > /tmp/wheels/$name
    echo "$sum  /tmp/wheels/$name" | sha256sum -c - || return 1
  done < /tmp/carry/SHA256SUMS
  cp /tmp/carry/*.whl /tmp/wheels/ 2>/dev/null
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wheels/"$1"*.whl
}

case $step in
  none) ;;
  train)
    $python scripts/train_fashion_vit.py --device cuda --data /tmp/carry --epochs "${EPOCHS:-30}" --half --out "$out/fashion_vit.pth" 2>&1 \
      | tee "$out/train.log" | tail -8 ;;
  ort)
    join_wheels onnxruntime_gpu || exit 1
    join_wheels onnx_graphsurgeon
    $python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
    # MiniLM's shape with random weights (speed does not depend on them; nothing downloads)
    $python -c "import torch, transformers as tf; from tokenfuse.engines.torch_bench import MINILM
torch.manual_seed(0); tf.BertModel(tf.BertConfig(**MINILM)).save_pretrained('/tmp/minilm')"
    for dtype in ${DTYPES:-fp32 fp16}; do  # one dtype a call keeps each under the 10-minute limit
      for model in vit-b16 minilm; do
        case $model in
          vit-b16) source=(--model timm:vit_base_patch16_224 --random-init) ;;
          minilm) source=(--model hf:/tmp/minilm --seq-len 128) ;;
        esac
        $python -m tokenfuse.cli export "${source[@]}" --method pitome --r 0.9 --dtype $dtype --seed 0 -o /tmp/$model-$dtype.onnx | tail -1
        $python -m tokenfuse.cli bench /tmp/$model-$dtype.onnx --providers CUDAExecutionProvider --batch 1,8,32,64 --seconds 20 \
          --json "$out/bench-$model-ort-cuda-$dtype.json" | tail -7
      done
    done ;;
  trt)
    join_wheels tensorrt_rtx || exit 1
    for w in polygraphy onnx_graphsurgeon tensorrt_rtx_cu13_bindings; do join_wheels $w; done
    $python -c "import tensorrt_rtx as trt; print('tensorrt_rtx', trt.__version__)"
    $python -m tokenfuse.cli export --model timm:vit_base_patch16_224 --random-init --method pitome --r 0.9 --seed 0 -o /tmp/vit.onnx | tail -1
    $python -m tokenfuse.cli build /tmp/vit.onnx -o /tmp/vit.engine 2>&1 | tee "$out/trt-build.log" | tail -20 ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
