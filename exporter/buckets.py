"""Length-adaptive text exports: one graph per length bucket, the weights stored once.

Token budgets stay fixed per layer for a given length (no data-dependent shapes, what TensorRT
and ONNX Runtime run fastest), but a text no longer pays for the longest input: it runs in the
graph its length selects (the smallest bucket that holds it, padded to that bucket, or the
unmerged graph at its own length), never padded by its batch-mates, so its result depends on the
text alone. Each bucket has its own budget (the same method and kept fraction at
that length). Texts of at most `unmerged_up_to` tokens, where merging was measured not to pay
(docs/length-buckets.md), run unmerged in one graph with a dynamic sequence axis at their natural
length, as users run the plain model today; so do the texts in the lower part of each bucket, whose
padding to the bucket costs more than the merges save (`merge_from`).

Files: `NAME.onnx` is the longest bucket (what a tool that takes one graph gets), `NAME.lenL.onnx`
the other buckets, `NAME.natural.onnx` the unmerged dynamic-length graph, `NAME.weights` every
distinct large tensor of all of them once (ONNX external data, page-aligned), `NAME.json` the
manifest with a `buckets` list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .adapters import TextAdapter
from .budgets import BudgetReport, layer_gflops
from .errors import UsageError
from .manifest import Manifest
from .files import atomic_outputs
from .settings import MergeOptions
from . import onnx_export

# Up to 1.5x apart: a denser ladder (80, 96, 112, 128, 160, ...) pads less and ran faster, but
# leaves less padding for the merges to take, so more real tokens merge at the same --r: Lee-50's
# Pearson fell 0.017 below unmerged against 0.009 with these (docs/length-buckets.md). --buckets
# chooses another ladder.
LENGTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
UNMERGED_UP_TO = 64  # measured on ONNX Runtime CPU, batch 1 and 8 (docs/length-buckets.md)
# A merged graph runs at this share of the speed its FLOPs (merge ops included) promise, against the
# unmerged graph's: all-MiniLM-L6-v2 buckets 96, 128 and 192 on ONNX Runtime CPU, batch 1 and 8,
# broke even with the natural-length graph at 81, 108 and 165 tokens: 0.88-0.90 (docs/length-buckets.md)
MERGED_EFFICIENCY = 0.88
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside each graph
ALIGNMENT = 4096  # offsets on page boundaries, so runtimes can map the file


def bucket_lengths(longest: int, unmerged_up_to: int, ladder: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The merged buckets' lengths: those of `ladder` (default LENGTHS) above `unmerged_up_to` and
    below `longest`, which is always the last."""
    return tuple(length for length in ladder or LENGTHS if unmerged_up_to < length < longest) + (longest,)


def checked_ladder(ladder, longest: int, unmerged_up_to: int) -> tuple[int, ...]:
    """`--buckets` as given: ascending token counts above `unmerged_up_to` (shorter texts run
    unmerged) and none beyond the longest input."""
    ladder = tuple(ladder)
    given = ",".join(map(str, ladder))
    if not ladder or list(ladder) != sorted(set(ladder)):
        raise UsageError(f"--buckets {given}: give ascending token counts, e.g. 96,128,192")
    if ladder[0] <= unmerged_up_to:
        raise UsageError(f"--buckets {given}: texts of up to --unmerged-up-to {unmerged_up_to} tokens run unmerged, so every bucket "
                         f"must be longer; drop {ladder[0]} or lower --unmerged-up-to")
    if ladder[-1] > longest:
        raise UsageError(f"--buckets {ladder[-1]} is longer than the longest input ({longest}); raise --max-seq-len or drop it")
    return ladder


def merge_from(report: BudgetReport, shortest: int) -> int:
    """The shortest text length, from `shortest` up, that runs faster merged in the bucket of
    `report` (padded to its length) than unmerged at its own length, by FLOPs at MERGED_EFFICIENCY;
    beyond the bucket (its length + 1) where none does."""
    shape = report.shape
    merged = (report.gflops + report.merge_overhead_gflops) / MERGED_EFFICIENCY
    return next((length for length in range(shortest, shape.tokens + 1) if shape.layers * layer_gflops(shape, length, length) >= merged),
                shape.tokens + 1)


def served_lengths(buckets: list[dict]) -> list[list[list[int]]]:
    """The text lengths each bucket runs, as inclusive [first, last] ranges. Manifests from before
    `lengths` was written: the natural-length graph up to its limit, each bucket above the one
    before it."""
    if all("lengths" in bucket and bucket["lengths"] for bucket in buckets):
        return [bucket["lengths"] for bucket in buckets]
    served, previous = [], 0
    for bucket in buckets:
        served.append([[previous + 1, bucket["seq_len"]]])
        previous = bucket["seq_len"]
    return served


def describe_lengths(ranges: list[list[int]]) -> str:
    return ", ".join(f"{first}-{last}" if last > first else str(first) for first, last in ranges)


def bucket_indices(lengths: np.ndarray, buckets: list[dict]) -> np.ndarray:
    """The bucket each text of `lengths` tokens runs in (an index into `buckets`): the one whose
    served lengths hold it."""
    served = served_lengths(buckets)
    longest = max(last for ranges in served for _, last in ranges)
    if lengths.max() > longest:
        raise UsageError(f"a text of {int(lengths.max())} tokens is longer than the model's {longest}; truncate it "
                         "(the tokenizer's truncation=True) or export with a larger --max-seq-len")
    table = np.zeros(longest + 1, np.int64)
    for index, ranges in enumerate(served):
        for first, last in ranges:
            table[first:last + 1] = index
    return table[lengths]


def bucket_file(output: Path, length: int | None, longest: int) -> Path:
    if length is None:
        return output.with_name(f"{output.stem}.natural.onnx")
    return output if length == longest else output.with_name(f"{output.stem}.len{length}.onnx")


def weights_file(output: Path) -> Path:
    return output.with_suffix(".weights")


def share_weights(graphs: list[onnx.ModelProto], path: Path, location: str) -> dict:
    """Move every large initializer of `graphs` into the external-data file `path` (named
    `location` by the graphs), each distinct tensor once; returns the bytes stored and referenced."""
    placed: dict[bytes, tuple[int, int]] = {}
    referenced = 0
    with open(path, "wb") as out:
        for graph in graphs:
            for tensor in graph.graph.initializer:
                array = numpy_helper.to_array(tensor)
                if array.nbytes < EXTERNAL_MIN_BYTES:
                    continue
                data = array.tobytes()
                key = hashlib.sha256(data).digest() + str(array.dtype).encode() + repr(array.shape).encode()
                if key not in placed:
                    offset = -(-out.tell() // ALIGNMENT) * ALIGNMENT
                    out.write(b"\0" * (offset - out.tell()))
                    out.write(data)
                    placed[key] = (offset, len(data))
                offset, length = placed[key]
                referenced += length
                stored = onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
                stored.data_location = onnx.TensorProto.EXTERNAL
                for field, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                    stored.external_data.add(key=field, value=value)
                tensor.CopyFrom(stored)
        stored_bytes = out.tell()
    return {"stored_bytes": stored_bytes, "referenced_bytes": referenced}


def export_length_adaptive(adapter: TextAdapter, merge_options: MergeOptions, output: Path, *, longest: int | None, lowering: str,
                           unmerged_up_to: int, opset: int, dtype: str, validate: bool, seed: int | None, extra: dict, log,
                           ladder: tuple[int, ...] | None = None, always_merge: bool = False) -> dict:
    """Export, validate and write every graph of `adapter`'s length-adaptive model; return the
    manifest. Within each bucket, texts too short for the merges to pay for their padding run
    unmerged at their natural length, unless `always_merge`."""
    if merge_options.schedule is not None or isinstance(merge_options.r, int) or merge_options.min_tokens is not None:
        raise UsageError("--schedule, an integer --r and --min-tokens fix token counts for one length; give --seq-len N with them, "
                         "or a kept fraction (--r 0.9) for a length-adaptive export")
    longest = adapter.checked_length(longest or adapter.max_seq_len, "--max-seq-len")
    if unmerged_up_to < 0:
        raise UsageError(f"--unmerged-up-to {unmerged_up_to}: give a token count >= 0 (0: none forced unmerged)")
    if merge_options.method == "none":
        if ladder is not None:
            raise UsageError("--buckets: --method none runs every length unmerged in one graph; give a merge method or drop --buckets")
        if always_merge:
            raise UsageError("--always-merge: --method none merges no length; give a merge method or drop --always-merge")
        unmerged_up_to = longest
    unmerged_up_to = min(unmerged_up_to, longest)
    ladder = checked_ladder(ladder, longest, unmerged_up_to) if ladder is not None else None
    plans = merged_buckets(adapter, merge_options, bucket_lengths(longest, unmerged_up_to, ladder) if unmerged_up_to < longest else (),
                           unmerged_up_to, always_merge, log)
    onnx_export.check_request(adapter, output, opset, dtype)
    unmerged = unserved([[first, length] for length, first, *_ in plans], longest)
    top = plans[-1][0] if plans else longest
    files = ([bucket_file(output, None, top)] if unmerged else []) + [bucket_file(output, length, top) for length, *_ in plans]
    if not plans:  # every length unmerged: the natural-length graph is the model
        files[0] = output
    weights, manifest_path = weights_file(output), output.with_suffix(".json")
    graphs, buckets, started = [], [], time.time()
    steps = len(files)
    with tempfile.TemporaryDirectory(prefix="tokenfuse-") as work:
        if unmerged:
            log(f"graph 1/{steps}: texts of {describe_lengths(unmerged)} tokens, unmerged at their natural length")
            graph, bucket = onnx_export.natural_length_graph(adapter, Path(work), opset=opset, dtype=dtype, log=log, longest=unmerged[-1][1])
            graphs.append(graph)
            buckets.append(bucket | {"seq_len": unmerged[-1][1], "lengths": unmerged, "file": files[0].name, "schedule": None,
                                     "lowering": "onnx"})
        for (length, first, sized, settings, report), file in zip(plans, files[bool(unmerged):]):
            log(f"graph {len(graphs) + 1}/{steps}: texts of {first}-{length} tokens, {merge_options.method} at {length}")
            settings = dataclasses.replace(settings, lowering=lowering)
            Path(work, str(length)).mkdir()
            graph, bucket = onnx_export.build_graph(sized, settings, report, Path(work, str(length)), opset=opset, dtype=dtype,
                                                    run_validation=validate, seed=seed, extra={**extra, "seq_len": length}, log=log)
            graphs.append(graph)
            buckets.append(bucket | {"seq_len": length, "lengths": [[first, length]], "file": file.name})
        log(f"writing {len(files)} graph{'s' * (len(files) > 1)}, {weights.name} and {manifest_path.name}")
        with atomic_outputs(*files, weights, manifest_path) as temps:
            storage = share_weights(graphs, temps[-2], weights.name)
            for graph, tmp in zip(graphs, temps):
                onnx.save(graph, str(tmp))
            result = manifest(buckets, storage, longest, {"unmerged_up_to": unmerged_up_to, "always_merge": always_merge,
                                                          "merged_efficiency": None if always_merge else MERGED_EFFICIENCY}, weights.name)
            temps[-1].write_text(json.dumps(result, indent=2) + "\n")
    log(f"exported {len(files)} graph{'s' * (len(files) > 1)} in {time.time() - started:.0f}s: " + ", ".join(_describe(b) for b in buckets)
        + f"; weights {storage['stored_bytes'] / 2**20:.1f} MiB stored once for {storage['referenced_bytes'] / 2**20:.1f} MiB referenced")
    return result


class NothingToMerge(UsageError):
    """Merging pays at no length of any bucket (so the export would be the plain model)."""


def merged_buckets(adapter: TextAdapter, merge_options: MergeOptions, lengths: tuple[int, ...], unmerged_up_to: int, always_merge: bool,
                   log) -> list[tuple]:
    """Each merged bucket worth a graph: (length, the shortest text it runs, the adapter at that
    length, its settings and budget). A bucket whose every text runs faster unmerged is left out."""
    plans, previous, report = [], unmerged_up_to, None
    for length in lengths:
        sized = adapter.with_seq_len(length)
        settings, report = merge_options.resolve(sized)
        first = previous + 1 if always_merge else merge_from(report, previous + 1)
        if first <= length:
            plans.append((length, first, sized, settings, report))
        else:
            log(f"bucket {length}: {merge_options.method} saves too little to pay for the padding to {length} tokens; "
                f"texts of {previous + 1}-{length} tokens run unmerged")
        previous = length
    if lengths and not plans:
        raise NothingToMerge(f"{merge_options.method} at --r {report.ratio} saves too little at every length up to {lengths[-1]} to pay for "
                         "merging (docs/length-buckets.md); lower --r, export --method none, or give --always-merge")
    return plans


def unserved(ranges: list[list[int]], longest: int) -> list[list[int]]:
    """The lengths 1..`longest` that none of the (ascending, inclusive) `ranges` holds."""
    gaps, next_length = [], 1
    for first, last in ranges + [[longest + 1, longest + 1]]:
        if first > next_length:
            gaps.append([next_length, first - 1])
        next_length = last + 1
    return gaps


def _describe(bucket: dict) -> str:
    where = describe_lengths(bucket["lengths"])
    return f"{where} unmerged" if bucket.get("natural_length") else f"{where} {bucket['method']} at {bucket['seq_len']}"


BUCKET_KEYS = ("seq_len", "lengths", "file", "method", "natural_length", "schedule", "budget", "lowering", "inputs", "outputs", "validation")


def manifest(buckets: list[dict], storage: dict, longest: int, length_settings: dict, weights: str) -> dict:
    """The longest graph's manifest (what a reader of one graph needs), plus every bucket's own."""
    top = {key: value for key, value in buckets[-1].items() if key not in ("seq_len", "lengths", "file")}
    top["settings"] = {**top.get("settings", {}), "seq_len": None, "max_seq_len": longest, **length_settings}
    top["preprocess"] = {**top["preprocess"], "seq_len": longest, "length_adaptive": True}
    top["weights"] = {"file": weights, **storage}
    top["buckets"] = [{key: bucket.get(key, False if key == "natural_length" else None) for key in BUCKET_KEYS} for bucket in buckets]
    return top


def refuse_length_adaptive(manifest: Manifest | None, path: Path, command: str):
    """The commands that take one graph refuse a length-adaptive export with what to do instead."""
    if manifest is not None and manifest.length_adaptive:
        raise UsageError(f"{path} is a length-adaptive export ({len(manifest.buckets)} graphs); {command} takes one graph "
                         "so far: export with --seq-len N for it")
