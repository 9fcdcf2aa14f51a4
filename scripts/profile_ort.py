"""Where the time goes: ONNX Runtime's per-operator profile of a merged model against its unmerged
baseline, at one batch size, on this machine's CPU. Answers why a measured speedup falls short of
the FLOPs ideal: which op types shrink as the token counts say, which do not, and what the merge
itself costs.

    .venv/bin/python scripts/profile_ort.py out/minilm.onnx out/minilm-none.onnx --batch 8 \\
        --out docs/profile-minilm-ort-cpu.json

Each model runs `--warmup` then `--runs` times with ORT's profiler on; an op type's time is its
median per run. The two graphs are shown side by side by op type: types only the merged graph has
are the merge's own work (comparisons, ranks, gathers); shared types show whether they shrank as
the token counts say.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(path: Path, batch: int, warmup: int, runs: int, threads: int | None) -> dict:
    """Median time per run (ms) of each op type, the node count of each type, and the run total."""
    manifest = json.loads(path.with_suffix(".json").read_text())
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="tokenfuse-profile-") as work:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work, "profile"))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in manifest["inputs"]:
            shape = [batch] + spec["shape"][1:]
            if spec["dtype"].startswith("int"):
                feeds[spec["name"]] = np.ones(shape, dtype=spec["dtype"])
            else:
                feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    measured = runs_seen[warmup:]
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in measured]
    per_type: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(windows))
    nodes: dict[str, set] = defaultdict(set)
    for event in trace:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"]["op_name"]
        nodes[op].add(event["name"])
        for index, (start, end) in enumerate(windows):
            if start <= event["ts"] <= end:
                per_type[op][index] += event["dur"] / 1000.0
                break
    return {
        "total_ms": statistics.median(e["dur"] / 1000.0 for e in measured),
        "ops": {op: {"ms": statistics.median(times), "nodes": len(nodes[op])} for op, times in per_type.items()},
        "flops_ratio": manifest["budget"]["flops_ratio"],
        "method": manifest["method"],
        "model": manifest["model"],
    }


def report(merged: dict, baseline: dict, batch: int) -> str:
    ops = sorted(set(merged["ops"]) | set(baseline["ops"]), key=lambda op: -(merged["ops"].get(op, {}).get("ms", 0.0)))
    kernel = {name: sum(v["ms"] for v in side["ops"].values()) for name, side in (("merged", merged), ("baseline", baseline))}
    lines = [
        f"# ONNX Runtime CPU profile: {merged['model']} {merged['method']} vs none, batch {batch}",
        "",
        f"Median per run. Whole run: {merged['total_ms']:.1f} ms merged vs {baseline['total_ms']:.1f} ms unmerged "
        f"({baseline['total_ms'] / merged['total_ms']:.2f}x; the FLOPs ratio {merged['flops_ratio']:.3f} gives an ideal of "
        f"{1 / merged['flops_ratio']:.2f}x). Kernel time summed over ops: {kernel['merged']:.1f} vs {kernel['baseline']:.1f} ms.",
        "",
        "| op type | merged ms | nodes | unmerged ms | nodes | merged / unmerged | share of merged |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in ops:
        m, b = merged["ops"].get(op, {"ms": 0.0, "nodes": 0}), baseline["ops"].get(op, {"ms": 0.0, "nodes": 0})
        ratio = f"{m['ms'] / b['ms']:.2f}" if b["ms"] > 0 else "new"
        lines.append(f"| {op} | {m['ms']:.2f} | {m['nodes']} | {b['ms']:.2f} | {b['nodes']} | {ratio} | {m['ms'] / kernel['merged']:.1%} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("merged", type=Path)
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, required=True, help="JSON; the Markdown table goes beside it")
    args = parser.parse_args()
    # Interleave: profile each twice, keep the second, so both see a warm machine.
    for _ in range(2):
        baseline = profile(args.baseline, args.batch, args.warmup, args.runs, args.threads)
        merged = profile(args.merged, args.batch, args.warmup, args.runs, args.threads)
    result = {"batch": args.batch, "runs": args.runs, "merged": merged, "baseline": baseline,
              "machine": {"cpu": platform.processor() or platform.machine(), "onnxruntime": ort.__version__}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(merged, baseline, args.batch))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
