"""`tokenfuse tune`: which method and budget, for this model, this data and this machine.

Every configuration (method x budget) is exported once, its fidelity is measured on the exported
ONNX in ONNX Runtime against the unmerged model's outputs on the same inputs (computed once, from
inputs preprocessed once), and its speed with bench's interleaved measurement against the
unmerged model. The Pareto front of speedup vs fidelity is printed, and the configuration that
meets the target is picked, with the `tokenfuse export` command that reproduces it.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..exporter.errors import UsageError
from ..exporter.files import atomic_outputs
from ..exporter.manifest import Manifest
from ..exporter.registry import method_names
from .bench import machine, measure_pair
from .runtime import load
from .data import Dataset, model_inputs, read_data, run_batched

NEIGHBOURS = 10  # each item's nearest neighbours within the data set, for embedding models
MIN_CLASSIFIER_ITEMS = 10
DEFAULT_METHODS = ("pitome", "tome", "crossget", "turbo")


def merge_methods() -> tuple[str, ...]:
    """The registered methods a sweep can try (every one that merges), the default sweep's first."""
    return (*DEFAULT_METHODS, *(name for name in method_names() if name not in DEFAULT_METHODS and name != "none"))
DEFAULT_MAX_DROP = 0.01
MEASURES = ("agreement", "accuracy", "cosine", "knn")


# --- fidelity -----------------------------------------------------------------------------------

def is_classifier(outputs: dict) -> bool:
    return "logits" in outputs


def minimum_items(classifier: bool) -> int:
    return MIN_CLASSIFIER_ITEMS if classifier else NEIGHBOURS + 1


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def neighbours(embeddings: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Each item's k nearest others by cosine ([N, k]; ties: the lower index)."""
    unit = _unit(embeddings)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def knn_overlap(reference: np.ndarray, merged: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean share of each item's k nearest neighbours that the merged embeddings keep."""
    a, b = neighbours(reference, k), neighbours(merged, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def knn_accuracy(embeddings: np.ndarray, labels: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Leave-one-out k-nearest-neighbour vote (ties: the label of the nearer neighbour)."""
    near = neighbours(embeddings, k)
    correct = 0
    for i, row in enumerate(near):
        votes: dict = {}
        for rank, j in enumerate(row):
            count, first = votes.get(labels[j], (0, rank))
            votes[labels[j]] = (count + 1, first)
        predicted = max(votes, key=lambda label: (votes[label][0], -votes[label][1]))
        correct += predicted == labels[i]
    return correct / len(near)


def class_index(labels: list[str], classes: int) -> np.ndarray:
    """Labels as class indices: integer labels as they are, names in sorted order (ImageFolder)."""
    if all(label.lstrip("-").isdigit() for label in labels):
        index = np.array([int(label) for label in labels])
    else:
        names = sorted(set(labels))
        index = np.array([names.index(label) for label in labels])
    if index.min() < 0 or index.max() >= classes:
        raise UsageError(f"--data labels name {len(set(labels))} classes but the model has {classes} outputs; "
                         "name class folders/labels 0..C-1 or in the model's class order")
    return index


def fidelity(reference: dict, merged: dict, labels: list[str] | None) -> dict:
    """What the merged outputs keep of the unmerged ones (and accuracy of both, with labels)."""
    if is_classifier(reference):
        ref, out = reference["logits"], merged["logits"]
        result = {"agreement": float(np.mean(ref.argmax(1) == out.argmax(1)))}
        if labels is not None:
            truth = class_index(labels, ref.shape[1])
            result["accuracy"] = float(np.mean(out.argmax(1) == truth))
            result["unmerged_accuracy"] = float(np.mean(ref.argmax(1) == truth))
        return result
    ref, out = reference["embedding"], merged["embedding"]
    result = {"cosine": float(np.mean(np.sum(_unit(ref) * _unit(out), axis=1))), "knn": knn_overlap(ref, out)}
    if labels is not None:
        truth = np.array(labels)
        result["accuracy"] = knn_accuracy(out, truth)
        result["unmerged_accuracy"] = knn_accuracy(ref, truth)
    return result


def drop(measures: dict, measure: str) -> float:
    """How much of `measure` merging lost (accuracy against the unmerged model's own)."""
    top = measures["unmerged_accuracy"] if measure == "accuracy" else 1.0
    return top - measures[measure]


# --- the sweep ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """One token budget: a kept ratio, a ToMe-style r, or a per-layer schedule."""

    r: float | int | None = None
    schedule: tuple[int, ...] | None = None
    label: str = ""

    def export_kwargs(self) -> dict:
        return {"schedule": self.schedule} if self.schedule else {"r": self.r}

    def flags(self) -> list[str]:
        if self.schedule:
            return ["--schedule", ",".join(map(str, self.schedule))]
        return ["--r", str(self.r)]


def decreasing_schedule(tokens: int, layers: int, mean_r: int) -> tuple[int, ...]:
    """Remove 2r tokens in the first layer falling linearly to none in the last (mean r)."""
    out, n = [], tokens
    for layer in range(layers):
        n -= round(2 * mean_r * (layers - 1 - layer) / max(layers - 1, 1))
        out.append(n)
    return tuple(out)


def default_budgets(tokens: int, layers: int) -> list[Budget]:
    """Kept ratios (PiToMe), two ToMe-style r and a decreasing schedule, coarse to fine: the first
    few span the range, so a tune cut short by its time limit still has a front."""
    ratio = {k: Budget(r=k, label=f"r={k}") for k in (0.95, 0.9, 0.85, 0.8)}
    small, large = (max(1, round(tokens * share / layers)) for share in (0.25, 0.5))
    mean_r = max(1, round(tokens * 0.35 / layers))
    decreasing = Budget(schedule=decreasing_schedule(tokens, layers, mean_r), label=f"decreasing (mean r={mean_r})")
    return [ratio[0.9], ratio[0.8], decreasing, Budget(r=large, label=f"r={large}"), ratio[0.95], ratio[0.85], Budget(r=small, label=f"r={small}")]


def parse_budgets(text: str, tokens: int, layers: int) -> list[Budget]:
    """`0.9` a kept ratio, `8` tokens removed per layer, `dec:8` a decreasing schedule of mean r 8."""
    from ..exporter.budgets import parse_r

    budgets = []
    for part in text.split(","):
        part = part.strip()
        if part.startswith("dec:"):
            mean_r = part[4:]
            if not mean_r.isdigit() or int(mean_r) < 1:
                raise UsageError(f"--budgets {part!r}: dec:R needs an integer mean r >= 1, e.g. dec:8")
            budgets.append(Budget(schedule=decreasing_schedule(tokens, layers, int(mean_r)), label=f"decreasing (mean r={mean_r})"))
        else:
            r = parse_r(part)
            budgets.append(Budget(r=r, label=f"r={r}"))
    return budgets


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speedup, fidelity) no other point beats on both, by speedup.

    A point is dominated when another is at least as good on both and better on one."""
    front = []
    for i, (s, f) in enumerate(points):
        dominated = any(s2 >= s and f2 >= f and (s2 > s or f2 > f) for j, (s2, f2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def choose(rows: list[dict], measure: str, max_drop: float | None, min_speedup: float | None) -> dict:
    """The fastest configuration within `max_drop`, or the most faithful at `min_speedup` or more."""
    if min_speedup is not None:
        meeting = [row for row in rows if row["speedup"] >= min_speedup]
        if not meeting:
            best = max(rows, key=lambda row: row["speedup"])
            raise UsageError(f"no budget reaches --min-speedup {min_speedup}: the fastest found is {describe(best, measure)}")
        return max(meeting, key=lambda row: (-row["drop"], row["speedup"]))
    meeting = [row for row in rows if row["drop"] <= max_drop + 1e-12]
    if not meeting:
        best = min(rows, key=lambda row: (row["drop"], -row["speedup"]))
        raise UsageError(f"no budget keeps the {measure} drop within --max-drop {max_drop}: the closest found is {describe(best, measure)}")
    return max(meeting, key=lambda row: (row["speedup"], -row["drop"]))


def describe(row: dict, measure: str) -> str:
    return f"{row['method']} {row['budget']} ({measure} drop {row['drop']:.4f}, speedup {row['speedup']:.2f}x)"


def export_command(spec: str, row: dict, options: dict) -> str:
    """The `tokenfuse export` command line that writes the chosen configuration."""
    words = ["tokenfuse", "export", "--model", spec, "-o", f"{row['method']}.onnx", "--method", row["method"], *row["flags"]]
    for flag, value in options.items():
        if value is True:
            words.append(flag)
        elif value is not None and value is not False:
            words += [flag, str(value)]
    return shlex.join(words)


def tune(
    model,
    data: str | Path | Dataset,
    *,
    methods=DEFAULT_METHODS,
    budgets: str | None = None,
    measure: str | None = None,
    max_drop: float | None = None,
    min_speedup: float | None = None,
    batch: int = 8,
    weights: str | None = None,
    random_init: bool = False,
    seq_len: int | None = None,
    tower: str = "vision",
    time_limit: float | None = None,
    seconds: float = 10.0,
    min_rounds: int = 20,
    threads: int | None = None,
    json_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    log=print,
) -> dict:
    """Sweep methods x budgets on `data`; return the report (front, pick, export command).

    `model` is a spec (`timm:NAME`, `hf:DIR`) or an Adapter (for models the CLI cannot name; its
    report then gives the Python `export` arguments instead of a command); `max_drop` and
    `min_speedup` are the two kinds of target (default: a drop of at most 0.01). The unmerged model
    is a candidate too (speedup 1, no drop): where no merge pays on this machine, it is the pick.
    Raises UsageError, writing nothing, when no configuration meets the target.
    """
    from tqdm import tqdm

    from ..exporter import export, load_model

    if max_drop is not None and min_speedup is not None:
        raise UsageError("give --max-drop or --min-speedup, not both")
    if max_drop is None and min_speedup is None:
        max_drop = DEFAULT_MAX_DROP
    if batch < 1:
        raise UsageError(f"--batch {batch}: must be >= 1")
    if time_limit is not None and time_limit <= 0:
        raise UsageError(f"--time-limit {time_limit}: must be a positive number of seconds")
    unknown = [m for m in methods if m not in merge_methods()]
    if unknown or not methods:
        raise UsageError(f"--methods {','.join(methods)}: choose from {','.join(merge_methods())}")
    if measure is not None and measure not in MEASURES:
        raise UsageError(f"--measure {measure}: choose one of {', '.join(MEASURES)}")
    started = time.monotonic()
    dataset = data if isinstance(data, Dataset) else read_data(data)

    adapter = load_model(model, weights=weights, random_init=random_init, seq_len=seq_len, tower=tower) if isinstance(model, str) else model
    shape = adapter.shape()
    feeds, truncated = model_inputs(dataset, adapter.preprocess())
    grid = parse_budgets(budgets, shape.tokens, shape.layers) if budgets else default_budgets(shape.tokens, shape.layers)
    options = {"--weights": weights, "--random-init": random_init, "--seq-len": adapter.shape().tokens if adapter.is_text else None}
    if tower != "vision":
        options["--tower"] = tower
    if truncated:
        log(f"note: {truncated} of {len(dataset.items)} texts are longer than the model's {shape.tokens} tokens and were cut (--seq-len)")

    rows, skipped = [], []  # rows: the unmerged model first, then every configuration measured
    with tempfile.TemporaryDirectory(prefix="tokenfuse-tune-") as work:
        quiet = lambda *_: None  # noqa: E731
        base_path = Path(work, "none.onnx")
        export(adapter, base_path, method="none", validate=False, log=quiet)
        baseline = load(base_path, providers=["CPUExecutionProvider"], threads=threads)
        reference = run_batched(baseline, feeds, batch)
        classifier = is_classifier(reference)
        needed = minimum_items(classifier)
        if len(dataset.items) < needed:
            raise UsageError(f"--data has {len(dataset.items)} items; {'top-1 agreement' if classifier else f'the {NEIGHBOURS}-nearest-neighbour overlap'} needs at least {needed}")
        measure = measure or ("agreement" if classifier else "knn")
        allowed = ("agreement", "accuracy") if classifier else ("cosine", "knn", "accuracy")
        if measure not in allowed:
            raise UsageError(f"--measure {measure}: this {'classifier' if classifier else 'embedding model'} is measured by {', '.join(allowed)}")
        if measure == "accuracy" and dataset.labels is None:
            raise UsageError("--measure accuracy needs labels (class subfolders, 'label' in JSONL or __label__ lines)")
        unmerged = fidelity(reference, reference, dataset.labels)  # labels that do not fit the model fail here, before the sweep
        rows.append({
            "method": "none", "budget": "unmerged", "flags": [], "export_kwargs": {"method": "none"},
            "schedule": [shape.tokens] * shape.layers, "flops_ratio": 1.0, "speedup": 1.0, **unmerged, "drop": 0.0,
        })

        configs = [(method, budget) for budget in grid for method in methods]
        with tqdm(configs, desc="tune", unit="config", disable=None) as progress:
            for index, (method, budget) in enumerate(progress):
                elapsed = time.monotonic() - started
                if time_limit is not None and index and elapsed >= time_limit:  # the first always runs
                    skipped += [{"method": m, "budget": b.label, "reason": "time limit"} for m, b in configs[index:]]
                    break
                progress.set_postfix_str(f"{method} {budget.label}")
                path = Path(work, f"{index}.onnx")
                config_started = time.monotonic()
                try:
                    manifest = Manifest.from_json(export(adapter, path, method=method, log=quiet, **budget.export_kwargs()))
                except UsageError as exc:  # a budget this method cannot take on this model
                    skipped.append({"method": method, "budget": budget.label, "reason": str(exc)})
                    continue
                merged = load(path, providers=["CPUExecutionProvider"], threads=threads)
                measures = fidelity(reference, run_batched(merged, feeds, batch), dataset.labels)
                left = seconds if time_limit is None else max(1.0, min(seconds, time_limit - (time.monotonic() - started)))
                with tqdm(desc="speed", unit="round", leave=False, disable=None) as rounds:
                    pair = measure_pair({"merged": merged, "baseline": baseline}, {"merged": None, "baseline": None}, batch,
                                        warmup=3, min_rounds=min_rounds, max_seconds=left, tolerance=0.01, progress=rounds)
                rows.append({
                    "method": method, "budget": budget.label, "flags": budget.flags(),
                    "export_kwargs": {"method": method, **budget.export_kwargs()}, "schedule": manifest.schedule, "flops_ratio": manifest.budget["flops_ratio"],
                    "speedup": pair["baseline"]["p50_ms"] / pair["merged"]["p50_ms"],
                    "merged_p50_ms": pair["merged"]["p50_ms"], "baseline_p50_ms": pair["baseline"]["p50_ms"],
                    "speed_stable": pair["stable"], **measures, "drop": drop(measures, measure),
                    "seconds": round(time.monotonic() - config_started, 1),
                })

    points = [(row["speedup"], -row["drop"]) for row in rows]
    front = pareto_front(points)
    for i, row in enumerate(rows):
        row["on_front"] = i in front
    report = {
        "model": model if isinstance(model, str) else adapter.name,
        "data": {"path": str(data) if not isinstance(data, Dataset) else None, "kind": dataset.kind, "items": len(dataset.items),
                 "labelled": dataset.labels is not None, "truncated_texts": truncated},
        "measure": measure,
        "target": {"max_drop": max_drop} if min_speedup is None else {"min_speedup": min_speedup},
        "unmerged": unmerged,
        "batch": batch,
        "machine": machine(),
        "rows": rows,
        "front": [rows[i] for i in front],
        "skipped": skipped,
        "seconds": None,
    }
    try:
        pick = choose(rows, measure, max_drop, min_speedup)
    except UsageError:
        log(front_table(report, None))
        raise
    report["pick"] = pick
    report["export_command"] = export_command(model, pick, options) if isinstance(model, str) else None
    report["seconds"] = round(time.monotonic() - started, 1)
    log(front_table(report, pick))
    if report["export_command"]:
        log(f"export it with:\n  {report['export_command']}")
    else:
        log(f"export it with the Python API: tokenfuse.exporter.export(model, 'pick.onnx', {_kwargs(pick['export_kwargs'])})")
    write_outputs(report, json_path, plot_path)
    return report


def _kwargs(values: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def front_table(report: dict, pick: dict | None) -> str:
    measure = report["measure"]
    extra = [k for k in ("agreement", "accuracy", "cosine", "knn") if any(k in row for row in report["front"])]
    lines = [f"Pareto front (speedup vs {measure}; the unmerged model and {len(report['rows']) - 1} configurations measured, "
             f"{len(report['skipped'])} skipped):",
             f"  {'':1} {'method':9} {'budget':26} {'speedup':>7} {'FLOPs':>6} " + " ".join(f"{k:>9}" for k in extra)]
    for row in report["front"]:
        mark = "*" if row is pick else " "
        lines.append(f"  {mark} {row['method']:9} {row['budget']:26} {row['speedup']:6.2f}x {row['flops_ratio']:6.3f} "
                     + " ".join(f"{row[k]:9.4f}" for k in extra))
    if pick is not None:
        target = report["target"]
        goal = f"{measure} drop <= {target['max_drop']}" if "max_drop" in target else f"speedup >= {target['min_speedup']}"
        lines.append(f"* the pick for {goal}: {describe(pick, measure)}")
    return "\n".join(lines)


def write_outputs(report: dict, json_path, plot_path):
    """JSON and plot appear together and whole, or not at all."""
    writers = [(Path(p), write) for p, write in ((json_path, _write_json), (plot_path, plot)) if p]
    if not writers:
        return
    with atomic_outputs(*(path for path, _ in writers)) as temps:
        for (_, write), temp in zip(writers, temps):
            write(report, temp)


def _write_json(report: dict, path: Path):
    path.write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure = report["measure"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({row["method"] for row in report["rows"]}):
        rows = [row for row in report["rows"] if row["method"] == method]
        ax.scatter([r["speedup"] for r in rows], [-r["drop"] for r in rows], label=method, s=28)
    front = report["front"]
    ax.plot([r["speedup"] for r in front], [-r["drop"] for r in front], "k--", linewidth=1, label="Pareto front")
    pick = report.get("pick")
    if pick:
        ax.scatter([pick["speedup"]], [-pick["drop"]], s=180, facecolors="none", edgecolors="red", linewidths=2, label=f"pick: {pick['method']} {pick['budget']}")
    target = report["target"]
    if "max_drop" in target:
        ax.axhline(-target["max_drop"], color="red", linewidth=0.8, linestyle=":", label=f"max drop {target['max_drop']}")
    else:
        ax.axvline(target["min_speedup"], color="red", linewidth=0.8, linestyle=":", label=f"min speedup {target['min_speedup']}")
    ax.axvline(1.0, color="gray", linewidth=0.5)
    ax.set(xlabel="measured speedup vs unmerged (interleaved, p50)", ylabel=f"{measure} change vs unmerged",
           title=f"{Path(str(report['model'])).name}: {report['data']['items']} {report['data']['kind']}s, batch {report['batch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
