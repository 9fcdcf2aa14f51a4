"""`tokenfuse bench`: the merged model against its unmerged baseline, interleaved in one run.

Machines here are shared and noisy, so the two models alternate call by call (each sees the same
noise), warm-up is excluded, and rounds continue until both medians are stable. The measured
speedup is reported beside the ideal from the FLOPs ratio in the manifest.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from ..exporter.errors import UsageError
from ..exporter.manifest import Manifest
from .runtime import Runner, fit_width, load
from .data import model_inputs, read_data


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--batch {text!r}: give comma-separated batch sizes, e.g. 1,8,32")
    if not batches or min(batches) < 1:
        raise UsageError(f"--batch {text!r}: batch sizes must be >= 1")
    return batches


def random_feeds(runner: Runner, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs shaped as the model takes them: normal pixels, or full-length random token ids (the
    longest a length-adaptive model takes)."""
    return feeds_for(runner.inputs, batch, rng, _preprocess(runner.manifest).get("seq_len"))


def feeds_for(inputs: list[dict], batch: int, rng: np.random.Generator, longest: int | None) -> dict[str, np.ndarray]:
    """Random inputs for binding specs `inputs` (name, shape, dtype), a dynamic axis at `longest`."""
    feeds = {}
    for spec in inputs:
        shape = [batch] + [longest if d in (-1, None) or isinstance(d, str) else d for d in spec["shape"][1:]]
        if spec["dtype"].startswith("int"):
            feeds[spec["name"]] = (np.ones(shape) if spec["name"] == "attention_mask" else rng.integers(1000, 2000, shape)).astype(spec["dtype"])
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(spec["dtype"])
    return feeds


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, in MiB (Linux)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _return_free_memory():
    """Ask glibc to hand freed memory back, so the next call's buffers show in the resident size."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_call_mib(runner: Runner, probe: Runner | None, feeds: dict) -> float | None:
    """Peak memory of one call: the TensorRT engine's activation memory, or on CPU the resident
    memory an arena-free call adds at its peak (Linux: the high-water mark is reset through
    /proc/self/clear_refs)."""
    known = runner.activation_mib()
    if known is not None:
        return known
    if probe is None:
        return None
    _return_free_memory()
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    before = _status_mib("VmRSS")
    probe.run(feeds)
    return _status_mib("VmHWM") - before


def machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "onnxruntime": ort.__version__, "gpu": gpu()}


def gpu() -> dict | None:
    """The first NVIDIA GPU's name, driver and memory (nvidia-smi), or None where there is none."""
    try:
        fields = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0].split(", ")
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(("name", "driver", "memory"), fields))


def where(report: dict) -> str:
    """The machine a report ran on, in words: the GPU when a GPU runtime ran it."""
    machine = report["machine"]
    cpu = f"{machine['cpu']} ({machine['cores']} cores)"
    on_gpu = report["backend"] == "tensorrt" or any(p != "CPUExecutionProvider" for p in report.get("providers") or [])
    if on_gpu and machine.get("gpu"):
        return f"{machine['gpu']['name']} (driver {machine['gpu']['driver']}), host {cpu}"
    return cpu


def percentiles(samples: list[float]) -> dict:
    """p50/p90/p99 in ms of call times in seconds."""
    ms = np.array(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)), "runs": len(ms)}


# Passes over the data before its timings may be called stable, so that each batch's median has
# five samples: with three (20 rounds over the 7 batches of 8 of Lee's 50 documents), one outlier
# moves a median, and the same comparison read 1.12x in one run and 1.17x in another.
MIN_PASSES = 5


def interleave(calls: dict, feeds: int, *, min_rounds: int, max_seconds: float, tolerance: float, progress=None):
    """Call each of `calls` (name -> fn(feed index), which returns once its work is done) in turn,
    round by round, cycling over `feeds` feed indices, until each one's time for one pass over the
    feeds (the sum of each feed's median) moves less than `tolerance` over the last max(10, 2 passes)
    rounds, after MIN_PASSES passes at least, or `max_seconds` pass. Returns (seconds per call
    [name][feed], pass seconds, stable).

    Every other round runs the calls in reverse order, so that neither is always the one that runs
    in the caches and thread state the other left."""
    samples = {name: [[] for _ in range(feeds)] for name in calls}
    window = max(10, 2 * feeds)
    order = list(calls.items())
    history, started, stable = [], time.perf_counter(), False
    while True:
        index = len(history) % feeds
        for name, call in order if len(history) % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            call(index)
            samples[name][index].append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
        seen = min(len(history) + 1, feeds)
        history.append({name: sum(statistics.median(s) for s in per_feed[:seen]) for name, per_feed in samples.items()})
        rounds = len(history)
        if rounds >= max(min_rounds, window + 1, MIN_PASSES * feeds):
            stable = all(abs(history[-1][n] - history[-1 - window][n]) <= tolerance * history[-1][n] for n in calls)
        if stable or time.perf_counter() - started > max_seconds:
            return samples, history[-1], stable


def measure_pair(runners: dict[str, Runner], probes: dict, batch: int, *, warmup: int, min_rounds: int, max_seconds: float, tolerance: float,
                 progress, feeds: list[dict] | None = None) -> dict:
    """Alternate the runners call by call over `feeds` (a list of {runner name: inputs}; default one
    random batch of `batch`) until their times are stable (interleave)."""
    if feeds is None:
        rng = np.random.default_rng(batch)
        feeds = [{name: random_feeds(r, batch, rng) for name, r in runners.items()}]
    for i in range(max(warmup, len(feeds))):  # every feed once at least: each input shape warmed
        for name, runner in runners.items():
            runner.run(feeds[i % len(feeds)][name])
    peaks = {name: peak_call_mib(runner, probes[name], feeds[0][name]) for name, runner in runners.items()}
    calls = {name: (lambda index, runner=runner, name=name: runner.run(feeds[index][name])) for name, runner in runners.items()}
    samples, passes, stable = interleave(calls, len(feeds), min_rounds=min_rounds, max_seconds=max_seconds, tolerance=tolerance, progress=progress)
    first = next(iter(runners))
    items = sum(len(next(iter(feed[first].values()))) for feed in feeds)  # per pass
    return {
        name: {**percentiles([t for s in per_feed for t in s]), "pass_ms": passes[name] * 1e3,
               "throughput_per_s": items / passes[name], "peak_call_mib": peaks[name]}
        for name, per_feed in samples.items()
    } | {"stable": stable, "passes": min(len(s) for s in samples[first])}


def data_feeds(runners: dict[str, Runner], manifest: Manifest | None, data, batch: int) -> tuple[list[dict], dict]:
    """The items of `data` (read_data) in batches of `batch`, in file order, as each runner takes
    them: texts padded to the longest in their batch (a fixed-length model gets its length), images
    preprocessed as the manifest says. Also what the inputs were (count, token lengths)."""
    from .preprocess import Preprocessor

    preprocess = _preprocess(manifest)
    if preprocess.get("kind") != data.kind:
        raise UsageError(f"the model takes {preprocess.get('kind')} input and --data holds {data.kind}s")
    if data.kind == "image":
        inputs, _ = model_inputs(data, preprocess)
        batches = [{k: v[i : i + batch] for k, v in inputs.items()} for i in range(0, len(data.items), batch)]
        return [{name: batch_ for name in runners} for batch_ in batches], {"items": len(data.items)}
    tokenizer = Preprocessor(preprocess).tokenizer
    longest = preprocess["seq_len"]
    feeds, lengths = [], []
    for i in range(0, len(data.items), batch):
        encoded = tokenizer(data.items[i : i + batch], padding="longest", truncation=True, max_length=longest, return_tensors="np")
        inputs = {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
        lengths.extend(inputs["attention_mask"].sum(1).tolist())
        feeds.append({name: fit_width(runner, inputs) for name, runner in runners.items()})
    return feeds, {"items": len(data.items), "tokens_p50": float(np.median(lengths)), "tokens_p90": float(np.percentile(lengths, 90)),
                   "tokens_max": max(lengths), "truncated_at": longest}


def ensure_baseline(model: Path, baseline: str | None, workdir: Path, log) -> Path:
    """The given baseline; else the model as users run it today, unmerged, in the same dtype: for a
    text encoder the natural-length export (dynamic sequence axis, each batch padded to its
    longest), for an image model the same model exported with --method none."""
    if baseline:
        return Path(baseline)
    if model.suffix != ".onnx":
        raise UsageError("an engine's baseline must be given with --baseline (build one from a --method none export)")
    manifest = Manifest.beside(model)
    if manifest is None:
        raise UsageError(f"{model}: no manifest beside it, so the baseline cannot be exported; pass --baseline")
    from ..exporter import export

    settings = manifest.settings
    if manifest.pooling and _preprocess(manifest).get("kind") == "text":  # a length-adaptive family
        target, lengths = workdir / "baseline-natural-length.onnx", {"max_seq_len": settings.get("max_seq_len") or settings.get("seq_len")}
        log(f"exporting the unmerged baseline of {manifest.model} at natural lengths (dynamic sequence axis) to {target}")
    else:
        target, lengths = workdir / "baseline-none.onnx", {"seq_len": settings.get("seq_len")}
        log(f"exporting the unmerged baseline of {manifest.model} (--method none) to {target}")
    export(
        manifest.model, target, method="none", weights=settings.get("weights"), random_init=settings.get("random_init", False),
        tower=settings.get("tower", "vision"), dtype=manifest.dtype, validate=False, log=lambda *_: None, **lengths,
    )
    return target


OPEN_ORDERS = {"model": ("merged", "baseline"), "baseline": ("baseline", "merged")}


def bench(
    model: str | Path,
    *,
    baseline: str | None = None,
    batches: tuple[int, ...] = (1, 8, 32),
    providers=None,
    threads: int | None = None,
    plugins: str | None = None,
    warmup: int = 3,
    min_rounds: int = 20,
    max_seconds: float = 60.0,
    tolerance: float = 0.01,
    data: str | None = None,
    profile: bool = False,
    open_first: str = "model",
    log=print,
) -> dict:
    """Benchmark `model` against its baseline at each batch size, on random full-size inputs or
    on the items of `data` (as tune reads it) at their real lengths; returns the report (see README).
    `profile`: instead, ONNX Runtime's per-operator profile of both at the first batch size (profile.py).
    `open_first` ("model" or "baseline"): which is loaded first. On a small CPU the order moved
    batch-1 speedups by 3-7% (docs/length-buckets.md); a run in each order shows it."""
    if open_first not in OPEN_ORDERS:
        raise UsageError(f"--open-first {open_first}: choose {' or '.join(OPEN_ORDERS)}")
    from tqdm import tqdm

    model = Path(model)
    if not model.is_file():
        raise UsageError(f"{model}: no such file")
    dataset = read_data(data) if data else None  # a bad --data fails before any baseline is exported
    with tempfile.TemporaryDirectory(prefix="tokenfuse-bench-") as work:
        baseline_path = ensure_baseline(model, baseline, Path(work), log)
        if profile:
            from .profile import profile_pair

            return profile_pair(model, baseline_path, batches[0], threads=threads, log=log)
        paths = {"merged": model, "baseline": baseline_path}
        loaded, rss = {}, {}
        for name in OPEN_ORDERS[open_first]:
            before = _status_mib("VmRSS")
            loaded[name] = load(paths[name], providers=providers, threads=threads, plugins=plugins, pad_to_longest=name == "baseline")
            rss[name] = _status_mib("VmRSS") - before
        runners = {name: loaded[name] for name in ("merged", "baseline")}  # the merged model first in every report
        probes = {name: runner.memory_probe(paths[name], threads) for name, runner in runners.items()}
        merged_manifest, base_manifest = runners["merged"].manifest, runners["baseline"].manifest
        ratio = _flops_ratio(merged_manifest)
        base_ratio = _flops_ratio(base_manifest) or 1.0
        ideal = (base_ratio / ratio) if ratio and dataset is None else None  # the manifest's ratio holds at its full length only
        results, inputs = [], {"kind": "random", "note": "full-length random inputs; pass --data for your own items' lengths"}
        for batch in batches:
            if dataset is None:
                full = random_feeds(runners["merged"], batch, np.random.default_rng(batch))
                feeds = [{name: fit_width(runner, full) for name, runner in runners.items()}]
            else:
                feeds, described = data_feeds(runners, merged_manifest, dataset, batch)
                inputs = {"kind": "data", "path": str(data), **described}
            with tqdm(desc=f"batch {batch}", unit="round", leave=False, disable=None) as progress:
                pair = measure_pair(runners, probes, batch, warmup=warmup, min_rounds=min_rounds, max_seconds=max_seconds, tolerance=tolerance,
                                    progress=progress, feeds=feeds)
            speedup = pair["baseline"]["pass_ms"] / pair["merged"]["pass_ms"]
            results.append({
                "batch": batch, **pair, "speedup": speedup, "flops_ideal_speedup": ideal,
                "realised_fraction_of_ideal": speedup / ideal if ideal else None,
            })
        return {
            "model": str(model),
            "baseline": str(baseline) if baseline else f"{merged_manifest.model if merged_manifest else None} unmerged, {_baseline_kind(base_manifest)} (exported by bench)",
            "inputs": inputs,
            "length_adaptive": bool(merged_manifest and merged_manifest.length_adaptive),
            "method": merged_manifest.method if merged_manifest else None,
            "flops_ratio": ratio,
            "backend": runners["merged"].backend,
            "providers": getattr(runners["merged"], "providers", None),
            "threads": threads,
            "machine": machine(),
            "memory_mib": {"rss_after_loading_merged": rss["merged"], "rss_after_loading_baseline": rss["baseline"]}, "opened_first": open_first,
            "results": results,
            "settings": {"warmup": warmup, "min_rounds": min_rounds, "max_seconds": max_seconds, "tolerance": tolerance},
        }


def _baseline_kind(manifest: Manifest | None) -> str:
    natural = manifest is not None and manifest.natural_length
    return "at natural lengths (dynamic sequence axis, each batch padded to its longest)" if natural else "--method none"


def _preprocess(manifest: Manifest | None) -> dict:
    return (manifest.preprocess if manifest else None) or {}


def _flops_ratio(manifest: Manifest | None) -> float | None:
    return manifest.flops_ratio if manifest else None


def markdown(report: dict) -> str:
    lines = [
        f"{report['method']} vs unmerged on {report['backend']} ({', '.join(report['providers'] or [])}), {where(report)}",
        "",
        "| batch | merged p50 / p90 / p99 ms | baseline p50 / p90 / p99 ms | merged /s | baseline /s | peak MiB merged / baseline | speedup | FLOPs ideal | realised | stable |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        m, b = row["merged"], row["baseline"]
        ideal = f"{row['flops_ideal_speedup']:.2f}x" if row["flops_ideal_speedup"] else "n/a"
        realised = f"{row['realised_fraction_of_ideal']:.0%}" if row["realised_fraction_of_ideal"] else "n/a"
        lines.append(
            f"| {row['batch']} | {m['p50_ms']:.1f} / {m['p90_ms']:.1f} / {m['p99_ms']:.1f} | {b['p50_ms']:.1f} / {b['p90_ms']:.1f} / {b['p99_ms']:.1f} "
            f"| {m['throughput_per_s']:.1f} | {b['throughput_per_s']:.1f} | {_mib(m['peak_call_mib'])} / {_mib(b['peak_call_mib'])} "
            f"| {row['speedup']:.2f}x | {ideal} | {realised} | {'yes' if row['stable'] else 'no'} |"
        )
    return "\n".join(lines)


def _mib(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    batches = [str(r["batch"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(rows))
    left.bar(x - 0.2, [r["baseline"]["p50_ms"] for r in rows], 0.4, label="unmerged")
    left.bar(x + 0.2, [r["merged"]["p50_ms"] for r in rows], 0.4, label=report["method"])
    left.set(xticks=x, xticklabels=batches, xlabel="batch", ylabel="p50 latency (ms)", title="latency")
    left.legend()
    right.plot(batches, [r["speedup"] for r in rows], "o-", label="measured")
    if rows[0]["flops_ideal_speedup"]:
        right.axhline(rows[0]["flops_ideal_speedup"], linestyle="--", color="gray", label="FLOPs ideal")
    right.axhline(1.0, color="black", linewidth=0.5)
    right.set(xlabel="batch", ylabel="speedup vs unmerged", title="speedup")
    right.legend()
    fig.suptitle(f"{Path(report['model']).name}: {report['backend']}, {where(report)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
