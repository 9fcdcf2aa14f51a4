"""`tokenfuse tune --lengths`: up to which length a text model should run unmerged, measured.

A length-adaptive export (exporter/buckets.py) runs texts of at most `--unmerged-up-to` tokens in
the plain model at their natural length, and each longer text merged in the smallest bucket that
holds it, padded to it. Whether a bucket pays depends on the machine, the batch size and the
model: it must beat the plain model on the texts that land in it, which are shorter than the
bucket. So for every bucket (P, L] this measures, with bench's interleaved timing, the bucket as
the export runs it (merged at L for the texts long enough to pay for their padding, unmerged at
their own length below that) against the plain natural-length graph, both on --data's texts that
fall in the bucket (through the runner, which splits a batch by length, as the export runs its
unmerged texts; where no text falls in it, rows of real tokens cut from --data at the bucket's middle),
and, for information, the embeddings' mean cosine to the plain model's over 32 rows (whether a
method and budget keep enough is what the sweep of `tokenfuse tune` answers).
The pick is the `--unmerged-up-to` with the least expected time per text, each bucket weighted by
the share of --data's texts that land in it, so the length distribution decides.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path

import numpy as np

from ..exporter.buckets import bucket_lengths
from ..exporter.errors import UsageError
from ..exporter.manifest import Manifest
from .bench import machine, measure_pair
from .data import Dataset, read_data, run_batched
from .runtime import load
from .tune import fidelity, merge_methods, write_outputs

FIDELITY_ROWS = 32  # rows the cosine is averaged over, at any batch size


def token_rows(tokenizer, texts: list[str], width: int, count: int) -> dict[str, np.ndarray]:
    """`count` rows of `width` real tokens: the texts' tokens run together and cut into windows,
    each framed as the tokenizer frames a text (BERT family: [CLS] ... [SEP])."""
    stream = [token for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for token in ids]
    frame = tokenizer("")["input_ids"]  # the special tokens alone
    inner = width - len(frame)
    if not stream or inner < 1:
        raise UsageError("--data gives no tokens to measure with; give a file of real texts")
    windows = np.resize(np.array(stream, np.int64), (count, inner))
    ids = np.concatenate([np.full((count, 1), frame[0]), windows, np.tile(np.array(frame[1:], np.int64), (count, 1))], axis=1)
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}


def bucket_rows(tokenizer, texts: list[str], text_lengths: np.ndarray, previous: int, length: int, count: int) -> tuple[dict, int]:
    """`count` rows of the texts that fall in the bucket (previous, length] at their own lengths
    (padded to the longest, as a tokenizer pads a batch), and their mean length; where no text
    falls in it, rows of real tokens at the bucket's middle length."""
    inside = np.flatnonzero((text_lengths > previous) & (text_lengths <= length))
    if not len(inside):
        width = max(previous + round((length - previous) / 2), len(tokenizer("")["input_ids"]) + 1)
        return token_rows(tokenizer, texts, width, count), width
    encoded = tokenizer([texts[i] for i in np.resize(inside, count)], padding="longest", truncation=True, max_length=length, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask")}, round(float(text_lengths[inside].mean()))


def measure_bucket(adapter, path: Path, plain, rows_of_text: dict, previous: int, length: int, *, method: str, r: float, batch: int,
                   seconds: float, min_rounds: int, threads: int | None) -> dict:
    """The bucket (previous, length] as the export would run it, against the plain model on the
    same texts: merged at `length` for the texts long enough to pay for their padding, unmerged
    at their own length below that (a length-adaptive export of just this bucket, which routes
    each text as the full export does)."""
    from tqdm import tqdm

    from ..exporter import export

    try:
        manifest = Manifest.from_json(export(adapter, path, method=method, r=r, max_seq_len=length, unmerged_up_to=previous, validate=False,
                                             log=lambda *_: None))
    except UsageError as error:  # merging pays at no length of this bucket: the export runs all of it unmerged
        if "saves too little" not in str(error):
            raise
        return {"merge_from": None, "tokens_out": None, "speedup": 1.0, "merged_p50_ms": None, "plain_p50_ms": None, "speed_stable": True,
                "cosine": 1.0}
    merged = load(path, providers=["CPUExecutionProvider"], threads=threads)
    texts = {name: array[:batch] for name, array in rows_of_text.items()}
    with tqdm(desc="speed", unit="round", leave=False, disable=None) as rounds:
        pair = measure_pair({"merged": merged, "plain": plain}, {"merged": None, "plain": None}, batch, warmup=3, min_rounds=min_rounds,
                            max_seconds=seconds, tolerance=0.01, progress=rounds, feeds=[{"merged": texts, "plain": texts}])
    return {"merge_from": manifest.buckets[-1]["lengths"][0][0], "tokens_out": manifest.schedule[-1],
            "speedup": pair["plain"]["p50_ms"] / pair["merged"]["p50_ms"], "merged_p50_ms": pair["merged"]["p50_ms"],
            "plain_p50_ms": pair["plain"]["p50_ms"], "speed_stable": pair["stable"],
            "cosine": fidelity(run_batched(plain, rows_of_text, batch), run_batched(merged, rows_of_text, batch), None)["cosine"]}


def unmerged_up_to(rows: list[dict]) -> int:
    """The `--unmerged-up-to` (0 or a bucket's length) with the least expected time per text: texts
    up to it take the plain model's time, longer ones their bucket's merged time, each bucket
    weighted by its share of the data. Buckets no text reached keep a small weight, so they still
    count where the data is silent; ties go to running more unmerged."""
    floor = 0.01 / len(rows)
    weights = [row["share"] + floor for row in rows]

    def cost(limit: int) -> float:  # a bucket without a merged graph runs unmerged either way
        return sum(w * (row["plain_p50_ms"] if row["seq_len"] <= limit else row["merged_p50_ms"]) for w, row in zip(weights, rows)
                   if row.get("merged_p50_ms") is not None)

    return min([0] + [row["seq_len"] for row in rows], key=lambda limit: (cost(limit), -limit))


def tune_lengths(
    model: str,
    data: str | Path | Dataset,
    *,
    method: str = "pitome",
    r: float = 0.9,
    batch: int = 8,
    max_seq_len: int | None = None,
    seconds: float = 5.0,
    min_rounds: int = 20,
    threads: int | None = None,
    json_path: str | Path | None = None,
    log=print,
) -> dict:
    """Measure every length bucket of `model` (an hf:DIR text encoder) merged with `method` at
    kept fraction `r` against the plain model; return the report with the `--unmerged-up-to` pick."""
    from transformers import AutoTokenizer
    from tqdm import tqdm

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
    lengths = bucket_lengths(longest, 0)
    folder = adapter.preprocess().get("tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise UsageError(f"{model}: no tokenizer in {folder}; tune --lengths counts the data's tokens with the model's own tokenizer")
    text_lengths = np.minimum([len(ids) for ids in tokenizer(dataset.items)["input_ids"]], longest)
    shares = np.bincount(np.searchsorted(lengths, text_lengths), minlength=len(lengths)) / len(text_lengths)

    rows = []
    with tempfile.TemporaryDirectory(prefix="tokenfuse-lengths-") as work:
        quiet = lambda *_: None  # noqa: E731
        plain_path = Path(work, "plain.onnx")
        export(adapter, plain_path, method="none", max_seq_len=longest, validate=False, log=quiet)
        plain = load(plain_path, providers=["CPUExecutionProvider"], threads=threads)  # splits a batch by length, as it runs in the export
        previous = 0
        with tqdm(lengths, desc="lengths", unit="bucket", disable=None) as progress:
            for length, share in zip(progress, shares):
                rows_of_text, width = bucket_rows(tokenizer, dataset.items, text_lengths, previous, length, max(batch, FIDELITY_ROWS))
                progress.set_postfix_str(f"{length} tokens (texts of ~{width})")
                rows.append({"seq_len": length, "share": float(share), "text_tokens": width,
                             **measure_bucket(adapter, Path(work, f"{length}.onnx"), plain, rows_of_text, previous, length, method=method,
                                              r=r, batch=batch, seconds=seconds, min_rounds=min_rounds, threads=threads)})
                previous = length

    pick = unmerged_up_to(rows)
    command = ["tokenfuse", "export", "--model", model, "-o", "model.onnx"]
    command += ["--method", "none"] if pick == longest else ["--method", method, "--r", str(r), "--unmerged-up-to", str(pick)]
    report = {
        "model": model, "method": method, "r": r, "batch": batch, "max_seq_len": longest,
        "data": {"path": str(data) if not isinstance(data, Dataset) else None, "items": len(dataset.items)},
        "machine": machine(), "rows": rows, "unmerged_up_to": pick,
        "export_command": shlex.join(command + ["--max-seq-len", str(longest)]), "seconds": round(time.monotonic() - started, 1),
    }
    log(lengths_table(report))
    write_outputs(report, json_path, None)
    return report


def lengths_table(report: dict) -> str:
    lines = [f"{report['method']} r={report['r']} per length bucket against the plain model at natural lengths, batch {report['batch']}:",
             f"  {'bucket':>6} {'of data':>7} {'measured at':>11} {'merged from':>12} {'tokens out':>10} {'speedup':>8} {'cosine':>8}"]
    for row in report["rows"]:
        if row["merge_from"] is None:
            lines.append(f"  {row['seq_len']:>6} {row['share']:>7.0%} {row['text_tokens']:>11}  merging pays at no length: runs unmerged")
            continue
        lines.append(f"  {row['seq_len']:>6} {row['share']:>7.0%} {row['text_tokens']:>11} {row['merge_from']:>12} {row['tokens_out']:>10} "
                     f"{row['speedup']:>7.2f}x {row['cosine']:>8.4f}")
    pick = report["unmerged_up_to"]
    if pick == report["max_seq_len"]:
        verdict = "on these lengths the plain model is fastest everywhere: export it (--method none)"
    else:
        verdict = f"run texts of up to {pick} tokens unmerged (--unmerged-up-to {pick})" if pick else "merge every length (--unmerged-up-to 0)"
    lines.append(f"pick (least expected time per text on this data's lengths): {verdict}")
    lines.append(f"export it with:\n  {report['export_command']}")
    return "\n".join(lines)
