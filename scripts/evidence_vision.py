"""Vision evidence: the Fashion-MNIST ViT (scripts/train_fashion_vit.py) through exported ONNX.

For each method and kept fraction r, the trained model is exported with tokenfuse (the same path
as `tokenfuse export`, here through the Python API because the model is a timm ViT with custom
sizes) and its test-set top-1 is measured in ONNX Runtime on all 10,000 test images.

    .venv/bin/python scripts/evidence_vision.py --weights scripts/fashion_vit.pth --out docs/evidence-vision.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from evidence_common import settings, sweep_parser, write_report
from train_fashion_vit import MODEL_ARGS, create_model, load_split


def top1(onnx_path: Path, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    from tokenfuse.engines import load

    runner = load(onnx_path, providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(images), batch):
        logits = runner.run({"pixel_values": images[i : i + batch].numpy()})["logits"]
        correct += int((logits.argmax(1) == labels[i : i + batch].numpy()).sum())
    return correct / len(images)


def main(argv=None):
    parser = sweep_parser(__doc__, "docs/evidence-vision.json")
    parser.add_argument("--weights", default="scripts/fashion_vit.pth")
    args = parser.parse_args(argv)

    from tokenfuse.exporter import export
    from tokenfuse.exporter.adapters import adapter_for

    images, labels = load_split("test")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for method, r in settings(args):
            started = time.time()
            model = create_model()
            model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
            adapter = adapter_for(model.eval())
            path = Path(work) / f"{method}-{r}.onnx"
            manifest = export(adapter, path, method=method, r=r, turbo_threshold=0, log=lambda *_: None)
            rows.append({
                "method": method,
                "r": r,
                "top1": top1(path, images, labels),
                "flops_ratio": manifest["budget"]["flops_ratio"],
                "whole_model_flops_ratio": manifest["budget"]["whole_model_flops_ratio"],
                "tokens_out": manifest["schedule"][-1],
                "validation_max_abs_error": manifest["validation"]["max_abs_error"],
                "seconds": round(time.time() - started, 1),
            })
            print(json.dumps(rows[-1]), flush=True)
    report = {
        "model": f"timm VisionTransformer {MODEL_ARGS}, trained by scripts/train_fashion_vit.py",
        "data": "Fashion-MNIST test set (10,000 images, Debian dataset-fashion-mnist), upsampled to 56x56",
        "tokens": 197,
        "runtime": "ONNX Runtime, CPU",
        "rows": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
