"""`tokenfuse bench --profile`: where the time goes. ONNX Runtime's per-operator profile of a
merged graph against its baseline at one batch size on this machine's CPU: which op types shrank
as the token counts say, which did not, and what the merge itself costs (the op types only the
merged graph has: comparisons, ranks, gathers)."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..exporter.errors import UsageError
from ..exporter.manifest import Manifest
from .bench import feeds_for, machine


def profile_graph(path: Path, feeds: dict[str, np.ndarray], warmup: int, runs: int, threads: int | None) -> dict:
    """Median time per run (ms) of each op type, its node count, and the whole run's median."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory(prefix="tokenfuse-profile-") as work:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(work, "profile"))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    measured = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"][warmup:]
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
    return {"total_ms": statistics.median(e["dur"] / 1000.0 for e in measured),
            "ops": {op: {"ms": statistics.median(times), "nodes": len(nodes[op])} for op, times in per_type.items()}}


def profile_pair(model: Path, baseline: Path, batch: int, *, threads: int | None = None, warmup: int = 5, runs: int = 30, log=print) -> dict:
    """Both graphs profiled twice, interleaved, the second kept (both then see a warm machine)."""
    manifest = Manifest.beside(model)
    if model.suffix != ".onnx" or manifest is None:
        raise UsageError(f"{model}: --profile takes an .onnx written by tokenfuse export (ONNX Runtime's CPU profiler)")
    if manifest.length_adaptive:
        raise UsageError(f"{model} is a length-adaptive export; --profile takes one graph: export with --seq-len N")
    feeds = feeds_for(manifest.inputs, batch, np.random.default_rng(0), (manifest.preprocess or {}).get("seq_len"))
    for round_ in (1, 2):
        log(f"profiling round {round_}/2: {baseline.name}, then {model.name}, batch {batch}, {runs} runs each")
        base = profile_graph(baseline, feeds, warmup, runs, threads)
        merged = profile_graph(model, feeds, warmup, runs, threads)
    return {"model": manifest.model, "method": manifest.method, "flops_ratio": manifest.flops_ratio,
            "batch": batch, "runs": runs, "merged": merged, "baseline": base,
            "machine": machine()}


def markdown(result: dict) -> str:
    merged, baseline = result["merged"], result["baseline"]
    ops = sorted(set(merged["ops"]) | set(baseline["ops"]), key=lambda op: -merged["ops"].get(op, {}).get("ms", 0.0))
    kernel = {name: sum(v["ms"] for v in side["ops"].values()) for name, side in (("merged", merged), ("baseline", baseline))}
    ideal = f"; the FLOPs ratio {result['flops_ratio']:.3f} gives an ideal of {1 / result['flops_ratio']:.2f}x" if result["flops_ratio"] else ""
    lines = [
        f"# ONNX Runtime CPU profile: {result['model']} {result['method']} vs unmerged, batch {result['batch']}",
        "",
        f"Median per run. Whole run: {merged['total_ms']:.1f} ms merged vs {baseline['total_ms']:.1f} ms unmerged "
        f"({baseline['total_ms'] / merged['total_ms']:.2f}x{ideal}). Kernel time summed over ops: {kernel['merged']:.1f} vs "
        f"{kernel['baseline']:.1f} ms. Op types the unmerged graph lacks are the merge's own work.",
        "",
        "| op type | merged ms | nodes | unmerged ms | nodes | merged / unmerged | share of merged |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in ops:
        m, b = merged["ops"].get(op, {"ms": 0.0, "nodes": 0}), baseline["ops"].get(op, {"ms": 0.0, "nodes": 0})
        ratio = f"{m['ms'] / b['ms']:.2f}" if b["ms"] > 0 else "new"
        lines.append(f"| {op} | {m['ms']:.2f} | {m['nodes']} | {b['ms']:.2f} | {b['nodes']} | {ratio} | {m['ms'] / kernel['merged']:.1%} |")
    return "\n".join(lines) + "\n"
