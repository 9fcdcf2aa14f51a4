"""Length-adaptive text exports: one graph per length bucket, the weights stored once.

Token budgets stay fixed per layer for a given length (no data-dependent shapes, what TensorRT
and ONNX Runtime run fastest), but a text no longer pays for the longest input: it runs in the
smallest bucket that holds it, padded to that bucket and never by its batch-mates, so its result
depends on the text alone. Each bucket has its own budget (the same method and kept fraction at
that length). Texts of at most `unmerged_up_to` tokens, where merging was measured not to pay
(docs/length-buckets.md), run unmerged in one graph with a dynamic sequence axis at their natural
length, as users run the plain model today.

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


def bucket_indices(lengths: np.ndarray, buckets: list[dict]) -> np.ndarray:
    """The bucket each text of `lengths` tokens runs in (an index into `buckets`, ascending by
    length): the natural-length one up to its limit, else the smallest that holds it."""
    limits = np.array([bucket["seq_len"] for bucket in buckets])
    if lengths.max() > limits[-1]:
        raise UsageError(f"a text of {int(lengths.max())} tokens is longer than the model's {limits[-1]}; truncate it "
                         "(the tokenizer's truncation=True) or export with a larger --max-seq-len")
    return np.searchsorted(limits, lengths)


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
                           ladder: tuple[int, ...] | None = None) -> dict:
    """Export, validate and write every graph of `adapter`'s length-adaptive model; return the manifest."""
    if merge_options.schedule is not None or isinstance(merge_options.r, int) or merge_options.min_tokens is not None:
        raise UsageError("--schedule, an integer --r and --min-tokens fix token counts for one length; give --seq-len N with them, "
                         "or a kept fraction (--r 0.9) for a length-adaptive export")
    longest = adapter.checked_length(longest or adapter.max_seq_len, "--max-seq-len")
    if unmerged_up_to < 0:
        raise UsageError(f"--unmerged-up-to {unmerged_up_to}: give a token count >= 0 (0: every length merged)")
    if merge_options.method == "none":
        if ladder is not None:
            raise UsageError("--buckets: --method none runs every length unmerged in one graph; give a merge method or drop --buckets")
        unmerged_up_to = longest
    unmerged_up_to = min(unmerged_up_to, longest)
    ladder = checked_ladder(ladder, longest, unmerged_up_to) if ladder is not None else None
    lengths = bucket_lengths(longest, unmerged_up_to, ladder) if unmerged_up_to < longest else ()
    onnx_export.check_request(adapter, output, opset, dtype)
    natural = unmerged_up_to > 0
    files = ([bucket_file(output, None, longest)] if natural else []) + [bucket_file(output, length, longest) for length in lengths]
    if not lengths:  # every length unmerged: the natural-length graph is the model
        files[0] = output
    weights, manifest_path = weights_file(output), output.with_suffix(".json")
    graphs, buckets, started = [], [], time.time()
    steps = len(files)
    with tempfile.TemporaryDirectory(prefix="tokenfuse-") as work:
        if natural:
            log(f"graph 1/{steps}: texts of up to {unmerged_up_to} tokens, unmerged at their natural length")
            graph, bucket = onnx_export.natural_length_graph(adapter, Path(work), opset=opset, dtype=dtype, log=log)
            graphs.append(graph)
            buckets.append(bucket | {"seq_len": unmerged_up_to, "file": files[0].name, "schedule": None, "lowering": "onnx",
                                     "validation": None})
        for length, file in zip(lengths, files[natural:]):
            log(f"graph {len(graphs) + 1}/{steps}: texts of up to {length} tokens, {merge_options.method} at {length}")
            sized = adapter.with_seq_len(length)
            settings, report = merge_options.resolve(sized)
            settings = dataclasses.replace(settings, lowering=lowering)
            Path(work, str(length)).mkdir()
            graph, bucket = onnx_export.build_graph(sized, settings, report, Path(work, str(length)), opset=opset, dtype=dtype,
                                                    run_validation=validate, seed=seed, extra={**extra, "seq_len": length}, log=log)
            graphs.append(graph)
            buckets.append(bucket | {"seq_len": length, "file": file.name})
        log(f"writing {len(files)} graph{'s' * (len(files) > 1)}, {weights.name} and {manifest_path.name}")
        with atomic_outputs(*files, weights, manifest_path) as temps:
            storage = share_weights(graphs, temps[-2], weights.name)
            for graph, tmp in zip(graphs, temps):
                onnx.save(graph, str(tmp))
            result = manifest(buckets, storage, longest, unmerged_up_to, weights.name)
            temps[-1].write_text(json.dumps(result, indent=2) + "\n")
    log(f"exported {len(files)} graph{'s' * (len(files) > 1)} in {time.time() - started:.0f}s: " + ", ".join(_describe(b) for b in buckets)
        + f"; weights {storage['stored_bytes'] / 2**20:.1f} MiB stored once for {storage['referenced_bytes'] / 2**20:.1f} MiB referenced")
    return result


def _describe(bucket: dict) -> str:
    return f"up to {bucket['seq_len']} unmerged" if bucket.get("natural_length") else f"{bucket['seq_len']} {bucket['method']}"


BUCKET_KEYS = ("seq_len", "file", "method", "natural_length", "schedule", "budget", "lowering", "inputs", "outputs", "validation")


def manifest(buckets: list[dict], storage: dict, longest: int, unmerged_up_to: int, weights: str) -> dict:
    """The longest graph's manifest (what a reader of one graph needs), plus every bucket's own."""
    top = {key: value for key, value in buckets[-1].items() if key not in ("seq_len", "file")}
    top["settings"] = {**top.get("settings", {}), "seq_len": None, "max_seq_len": longest, "unmerged_up_to": unmerged_up_to}
    top["preprocess"] = {**top["preprocess"], "seq_len": longest, "length_adaptive": True}
    top["weights"] = {"file": weights, **storage}
    top["buckets"] = [{key: bucket.get(key, False if key == "natural_length" else None) for key in BUCKET_KEYS} for bucket in buckets]
    return top


def refuse_length_adaptive(manifest: Manifest | None, path: Path, command: str):
    """The commands that take one graph refuse a length-adaptive export with what to do instead."""
    if manifest is not None and manifest.length_adaptive:
        raise UsageError(f"{path} is a length-adaptive export ({len(manifest.buckets)} graphs); {command} takes one graph "
                         "so far: export with --seq-len N for it")
