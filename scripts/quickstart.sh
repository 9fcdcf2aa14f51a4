#!/usr/bin/env bash
# Set up, then export ViT-B/16 (random init, no downloads) with PiToMe r=0.9 and validate it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p out
.venv/bin/tokenfuse export --model timm:vit_base_patch16_224 --method pitome --r 0.9 -o out/vit.onnx
