"""`tokenfuse tune --lengths`: up to which length a text model should run unmerged, measured on
the user's texts as they arrive.

A length-adaptive export (exporter/buckets.py) runs texts of at most `--unmerged-up-to` tokens in
the plain model at their natural length, and each longer text merged in its bucket where the
merges pay for its padding. Whether that pays depends on the machine, the batch size, the model,
and how the data's lengths mix within a batch: a batch's texts spread over several buckets, each
a call of its own. So this exports the model once with every bucket (`--unmerged-up-to 0`) and
the plain model once, and times one pass over --data, in batches of --batch in file order, for
every `--unmerged-up-to` that routes the data's texts differently (0, each bucket's length, and
all unmerged), each run as tokenfuse's runner runs that export, all interleaved call by call
(bench's timing) with the plain model at natural lengths (each batch padded to its longest).
Also each candidate's mean embedding cosine to the plain model's. The pick is the fastest; of
candidates within 3% of it (TIE), the one that runs the most unmerged.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path

import numpy as np

from ..exporter.buckets import NothingToMerge, bucket_indices, unserved
from ..exporter.errors import UsageError
from ..exporter.manifest import Manifest
from .bench import data_feeds, machine, measure_pair
from .data import Dataset, read_data, run_batched
from .runtime import CALIBRATION_WIDTH, BucketRunner, OrtRunner, call_overhead_tokens, put_rows
from .tune import fidelity, merge_methods, write_outputs

FIDELITY_TEXTS = 256  # texts the cosine is averaged over (the first of --data)
# Candidates this close to the fastest count as fast as it: on a 2-core CPU the all-unmerged routing
# and the plain model itself (the same graph and session) timed 3% apart (docs/length-buckets.md)
TIE = 0.03


def candidate_buckets(merged: list[dict], natural_file: str, up_to: int, longest: int) -> list[dict]:
    """The buckets of the export at `--unmerged-up-to up_to`: the merged ones above it (each from
    the shortest length it pays for), the plain graph at natural length for every other length."""
    kept = []
    for bucket in merged:
        first = max(bucket["lengths"][0][0], up_to + 1)
        if first <= bucket["seq_len"]:
            kept.append({**bucket, "lengths": [[first, bucket["seq_len"]]]})
    unmerged = unserved([bucket["lengths"][0] for bucket in kept], longest)
    natural = [{"file": natural_file, "natural_length": True, "seq_len": unmerged[-1][1], "lengths": unmerged}] if unmerged else []
    return natural + kept


def distinct_candidates(merged: list[dict], natural_file: str, longest: int, lengths: np.ndarray) -> dict[int, list[dict]]:
    """`--unmerged-up-to` values (0, each bucket's length, `longest`: all unmerged) that route the
    data's `lengths` differently, each with its buckets; of those that route alike, the largest."""
    chosen: dict[tuple, tuple[int, list[dict]]] = {}
    for up_to in [0] + [bucket["seq_len"] for bucket in merged[:-1]] + [longest]:
        buckets = candidate_buckets(merged, natural_file, up_to, longest)
        chosen[tuple(buckets[i]["file"] for i in bucket_indices(lengths, buckets))] = (up_to, buckets)
    return dict(sorted(chosen.values(), key=lambda item: item[0]))


def pick(rows: list[dict]) -> int:
    """The fastest candidate's `--unmerged-up-to`; within TIE of it, the largest (more unmerged)."""
    fastest = min(row["pass_ms"] for row in rows)
    return max(row["unmerged_up_to"] for row in rows if row["pass_ms"] <= fastest * (1 + TIE))


def tune_lengths(
    model: str,
    data: str | Path | Dataset,
    *,
    method: str = "pitome",
    r: float = 0.9,
    batch: int = 8,
    max_seq_len: int | None = None,
    seconds: float = 30.0,
    min_rounds: int = 20,
    threads: int | None = None,
    json_path: str | Path | None = None,
    log=print,
) -> dict:
    """Time `model` (an hf:DIR text encoder), merged with `method` at kept fraction `r`, at every
    `--unmerged-up-to` that matters for `data`, against the plain model; return the report and pick."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ..exporter import export, load_model

    if batch < 1:
        raise UsageError(f"--batch {batch}: must be >= 1")
    if method not in merge_methods():
        raise UsageError(f"--methods {method}: choose one of {', '.join(merge_methods())}")
    if not isinstance(r, float) or not 0 < r < 1:
        raise UsageError(f"--r {r}: per-length tuning takes a kept fraction in (0, 1), e.g. 0.9 (each bucket has its own token count)")
    started = time.monotonic()
    dataset = data if isinstance(data, Dataset) else read_data(data)
    adapter = load_model(model)
    if not adapter.is_text or not adapter.length_adaptive:
        raise UsageError(f"--lengths is for text encoders with length-adaptive exports (BERT family); {adapter.name} is not one")
    if dataset.kind != "text":
        raise UsageError(f"--data holds {dataset.kind}s; --lengths measures a text model on texts")
    longest = adapter.checked_length(max_seq_len or adapter.max_seq_len, "--max-seq-len")
    folder = adapter.preprocess().get("tokenizer")
    try:  # before anything is exported: the data's lengths need it
        AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise UsageError(f"{model}: no tokenizer in {folder}; tune --lengths counts the data's tokens with the model's own tokenizer")

    with tempfile.TemporaryDirectory(prefix="tokenfuse-lengths-") as work:
        quiet = lambda *_: None  # noqa: E731
        log(f"exporting {method} r={r} with every bucket and the plain model ...")
        plain_path, merged_path = Path(work, "plain.onnx"), Path(work, "merged.onnx")
        export(adapter, plain_path, method="none", max_seq_len=longest, validate=False, log=quiet)
        try:
            manifest = Manifest.from_json(export(adapter, merged_path, method=method, r=r, max_seq_len=longest, unmerged_up_to=0,
                                                 validate=False, log=quiet))
            merged = [bucket for bucket in manifest.buckets if not bucket["natural_length"]]
        except NothingToMerge:  # merging pays at no length: only the plain model is left to time
            manifest, merged = Manifest.beside(plain_path), []
        sessions = {bucket["file"]: OrtRunner(Path(work, bucket["file"]), ["CPUExecutionProvider"], threads) for bucket in merged}
        sessions[plain_path.name] = OrtRunner(plain_path, ["CPUExecutionProvider"], threads)
        call_tokens = call_overhead_tokens(sessions[plain_path.name], CALIBRATION_WIDTH)  # one split for every candidate
        # the baseline shares the candidates' plain session: a session of its own would run with
        # colder caches, as the candidates' calls keep theirs warm (20% apart at batch 1 on a 2-core CPU)
        plain_manifest = Manifest.beside(plain_path)
        plain = BucketRunner(plain_path, plain_manifest, plain_manifest.buckets, lambda path: sessions[path.name], pad_to_longest=True)
        feeds, described = data_feeds({"plain": plain}, manifest, dataset, batch)
        lengths = np.array([length for feed in feeds for length in feed["plain"]["attention_mask"].sum(1)])
        candidates = distinct_candidates(merged, plain_path.name, longest, lengths)
        runners = {}
        for up_to, buckets in candidates.items():
            runners[up_to] = BucketRunner(merged_path, manifest, buckets, lambda path: sessions[path.name])
            runners[up_to].call_tokens = call_tokens
        names = {up_to: f"up to {up_to}" for up_to in candidates}
        log(f"timing {len(candidates)} routing{'s' * (len(candidates) > 1)} of {described['items']} texts at batch {batch} "
            f"against the plain model at natural lengths ...")
        with tqdm(desc="speed", unit="round", leave=False, disable=None) as rounds:
            timed = measure_pair({**{names[u]: runners[u] for u in candidates}, "plain": plain}, {name: None for name in [*names.values(), "plain"]},
                                 batch, warmup=1, min_rounds=min_rounds, max_seconds=seconds, tolerance=0.01, progress=rounds,
                                 feeds=[{**{names[u]: feed["plain"] for u in candidates}, **feed} for feed in feeds])
        starts = np.cumsum([0] + [len(feed["plain"]["input_ids"]) for feed in feeds])  # the batches as one, zero-padded to the widest
        whole = put_rows([(np.arange(start, end), feed["plain"]) for start, end, feed in zip(starts, starts[1:], feeds)], int(starts[-1]))
        sample = {name: array[:FIDELITY_TEXTS] for name, array in whole.items()}
        reference = run_batched(plain, sample, batch)
        rows = []
        for up_to, buckets in candidates.items():
            routed = bucket_indices(lengths, buckets)
            rows.append({
                "unmerged_up_to": up_to, "merged_share": float(np.mean([not buckets[i].get("natural_length") for i in routed])),
                "pass_ms": timed[names[up_to]]["pass_ms"], "plain_pass_ms": timed["plain"]["pass_ms"],
                "speedup": timed["plain"]["pass_ms"] / timed[names[up_to]]["pass_ms"],
                "cosine": fidelity(reference, run_batched(runners[up_to], sample, batch), None)["cosine"],
                "merged_from": [bucket["lengths"][0][0] for bucket in buckets if not bucket.get("natural_length")],
            })

    chosen = pick(rows)
    command = ["tokenfuse", "export", "--model", model, "-o", "model.onnx"]
    command += ["--method", "none"] if chosen == longest else ["--method", method, "--r", str(r), "--unmerged-up-to", str(chosen)]
    report = {
        "model": model, "method": method, "r": r, "batch": batch, "max_seq_len": longest,
        "data": {"path": str(data) if not isinstance(data, Dataset) else None, **described}, "machine": machine(),
        "buckets": [{"seq_len": bucket["seq_len"], "merged_from": bucket["lengths"][0][0]} for bucket in merged],
        "rows": rows, "stable": timed["stable"], "unmerged_up_to": chosen,
        "export_command": shlex.join(command + ["--max-seq-len", str(longest)]), "seconds": round(time.monotonic() - started, 1),
    }
    log(lengths_table(report))
    write_outputs(report, json_path, None)
    return report


def lengths_table(report: dict) -> str:
    data = report["data"]
    lines = [f"{report['method']} r={report['r']} on {data['items']} texts (median {data['tokens_p50']:.0f} tokens, p90 "
             f"{data['tokens_p90']:.0f}), one pass in batches of {report['batch']} in file order, against the plain model at natural "
             f"lengths{'' if report['stable'] else ' (times not stable within the time limit)'}:",
             f"  {'--unmerged-up-to':>16} {'texts merged':>12} {'pass ms':>9} {'speedup':>8} {'cosine':>8}"]
    for row in report["rows"]:
        label = "none" if row["unmerged_up_to"] == report["max_seq_len"] else str(row["unmerged_up_to"])
        lines.append(f"  {label:>16} {row['merged_share']:>12.0%} {row['pass_ms']:>9.1f} {row['speedup']:>7.2f}x {row['cosine']:>8.4f}")
    chosen = report["unmerged_up_to"]
    if chosen == report["max_seq_len"]:
        verdict = "on these texts the plain model is as fast as any merged routing: export it (--method none)"
    else:
        verdict = f"run texts of up to {chosen} tokens unmerged (--unmerged-up-to {chosen})" if chosen else "merge wherever a bucket pays (--unmerged-up-to 0)"
    lines.append(f"pick (the fastest; within {TIE:.0%} of it, the most unmerged): {verdict}")
    lines.append(f"export it with:\n  {report['export_command']}")
    return "\n".join(lines)
