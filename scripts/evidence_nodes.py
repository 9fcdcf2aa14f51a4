"""Graph nodes per merge step of each method's ONNX lowering (issue: a merge that costs little).

    python scripts/evidence_nodes.py            # ViT-Ti/16 (ViT-B/16's 12 layers and 197 tokens), r=0.9

Exports each method with `--random-init` weights, without validation, and counts the nodes as
written and after onnx-graphsurgeon's constant folding, against the `none` export; per merging
layer. Writes docs/lowering-nodes.json.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx

from tokenfuse.exporter import export
from tokenfuse.exporter.onnx_export import fold_constants

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "tome", "pitome", "crossget", "turbo")


def count(path: Path) -> tuple[int, int, collections.Counter]:
    model = onnx.load(str(path))
    folded = fold_constants(model)
    return len(model.graph.node), len(folded.graph.node), collections.Counter(n.op_type for n in folded.graph.node)


def main() -> int:
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        for method in METHODS:
            path = Path(work, f"{method}.onnx")
            manifest = export("timm:vit_tiny_patch16_224", path, random_init=True, method=method, r=0.9, validate=False, log=lambda *_: None)
            written, folded, ops = count(path)
            inputs = [layer["tokens_in"] for layer in manifest["budget"]["layers"]]
            merging = sum(out < tokens for out, tokens in zip(manifest["schedule"], inputs))
            rows[method] = {"nodes": written, "nodes_folded": folded, "merging_layers": merging, "ops_folded": dict(ops)}
    base = rows["none"]
    for method, row in rows.items():
        if row["merging_layers"]:
            row["per_merge"] = (row["nodes"] - base["nodes"]) / row["merging_layers"]
            row["per_merge_folded"] = (row["nodes_folded"] - base["nodes_folded"]) / row["merging_layers"]
            print(f"{method}: {row['per_merge']:.0f} nodes per merge step as written, {row['per_merge_folded']:.0f} after constant folding")
    out = ROOT / "docs" / "lowering-nodes.json"
    out.write_text(json.dumps({"command": "python scripts/evidence_nodes.py", "model": "timm:vit_tiny_patch16_224 (random init)", "r": 0.9,
                               "methods": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
