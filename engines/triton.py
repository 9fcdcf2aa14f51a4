"""`tokenfuse triton-repo`: a Triton Inference Server model repository for a tokenfuse model.

Layout written:
    REPO/NAME/config.pbtxt      platform, batching, instance groups, inputs and outputs
    REPO/NAME/1/model.onnx      (or model.plan for a TensorRT engine)
    REPO/NAME/tokenfuse.json    the export manifest (and the engine sidecar)
    REPO/README.md              how to start Triton on it, including plugin preloading
    REPO/NAME/plugins/          the plugin library an engine needs, if any

A length-adaptive text export (or its engines) gets one model per length bucket, NAME-lenL and
NAME-natural; the client sends each text to the bucket its length selects (the README lists them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..exporter.buckets import describe_lengths, served_lengths
from ..exporter.errors import UsageError
from ..exporter.manifest import Manifest
from .runtime import backend_for
from .dtypes import triton_type



def _tensors(entries: list[dict]) -> str:
    blocks = []
    for entry in entries:
        dims = ", ".join(str(d if isinstance(d, int) else -1) for d in entry["shape"][1:])  # a named axis is dynamic
        blocks.append(f'  {{\n    name: "{entry["name"]}"\n    data_type: {triton_type(entry["dtype"])}\n    dims: [ {dims} ]\n  }}')
    return ",\n".join(blocks)


def config_text(name: str, platform: str, max_batch: int, inputs: list[dict], outputs: list[dict], instances: int, kind: str, delay_us: int) -> str:
    preferred = sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch} | {max_batch})
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {max_batch}\n"
        f"input [\n{_tensors(inputs)}\n]\n"
        f"output [\n{_tensors(outputs)}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {delay_us}\n"
        "}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_{kind.upper()}\n  }}\n]\n"
    )


def _models(model: Path, name: str) -> tuple[Manifest | None, dict | None, list[dict]]:
    """(export manifest, engine sidecar, one entry per Triton model): a length-adaptive export or its
    engines give one model per bucket, named NAME-lenL (NAME-natural for the unmerged bucket)."""
    backend = backend_for(model)
    contents = backend.contents(model)
    if not contents.parts:
        raise UsageError(f"{model}: no manifest beside it; triton-repo needs the .json that tokenfuse export writes")
    buckets = [part["bucket"] for part in contents.parts]
    return contents.manifest, contents.sidecar, [
        {**part, "name": _bucket_name(name, part["bucket"], buckets), "platform": backend.triton_platform, "file_name": backend.triton_file}
        for part in contents.parts]


def _bucket_name(name: str, bucket: dict, buckets: list[dict]) -> str:
    if len(buckets) == 1:
        return name
    return f"{name}-natural" if bucket.get("natural_length") else f"{name}-len{bucket['seq_len']}"


def _place(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows (the weights are shared, not copied), else a copy."""
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, target)


def write_repository(
    model: str | Path,
    output: str | Path,
    *,
    name: str | None = None,
    max_batch: int = 32,
    instances: int = 1,
    kind: str = "gpu",
    delay_us: int = 5000,
) -> list[Path]:
    """Write the repository for `model` (.onnx or .engine) under `output`; return its model folders
    (one, or one per length bucket of a length-adaptive export)."""
    model, output = Path(model), Path(output)
    if not model.is_file():
        raise UsageError(f"{model}: no such file")
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"{output} exists and is not empty; give a new directory")
    if max_batch < 1 or instances < 1:
        raise UsageError("--max-batch and --instances must be >= 1")
    name = name or model.stem
    manifest, sidecar, entries = _models(model, name)
    weights = (manifest.weights or {}).get("file") if sidecar is None else None

    staging = Path(tempfile.mkdtemp(prefix=".triton-", dir=output.parent if output.parent.exists() else None))
    try:
        for entry in entries:
            folder = staging / entry["name"]
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(entry["file"], folder / "1" / entry["file_name"])
            if weights:  # the graphs name their external-data file; each version folder holds it
                _place(model.with_name(weights), folder / "1" / weights)
            batch = min(max_batch, entry["sidecar"]["batch_profile"]["max"]) if entry.get("sidecar") else max_batch
            (folder / "config.pbtxt").write_text(
                config_text(entry["name"], entry["platform"], batch, entry["inputs"], entry["outputs"], instances, kind, delay_us))
            (folder / "tokenfuse.json").write_text(
                json.dumps({"export_manifest": manifest.to_json() if manifest else None, "engine_sidecar": entry.get("sidecar"), "bucket": entry["bucket"] if len(entries) > 1 else None}, indent=2) + "\n")
        library, preload = (sidecar or {}).get("plugin_library"), ""
        if library:  # inside a model folder: Triton takes every top-level folder for a model
            home = entries[-1]["name"]
            (staging / home / "plugins").mkdir()
            shutil.copyfile(library["path"], staging / home / "plugins" / Path(library["path"]).name)
            preload = f"LD_PRELOAD=$PWD/{output.name}/{home}/plugins/{Path(library['path']).name} "
        (staging / "README.md").write_text(_readme(manifest, name, entries, output, preload, sidecar))
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [output / entry["name"] for entry in entries]


def _readme(manifest: Manifest | None, name: str, entries: list[dict], output: Path, preload: str, sidecar: dict | None) -> str:
    text = (f"# Triton model repository for {manifest.model if manifest else name} ({manifest.method if manifest else '?'})\n\n"
            f"    {preload}tritonserver --model-repository=$PWD/{output.name}\n\n")
    if preload:
        text += "The TensorRT plugin library is preloaded with LD_PRELOAD so the plans can deserialise.\n"
    if sidecar:
        text += "The plans run only with the TensorRT version and GPU they were built for (see tokenfuse.json).\n"
    if len(entries) > 1:
        text += ("\nA length-adaptive export: one model per length bucket. Send a text of L tokens to the model whose "
                 "lengths hold L, padded to its limit (the natural-length model: padded only to the longest text of the "
                 "request), so its result does not depend on its batch-mates:\n\n| model | texts of (tokens) | tokens fed |\n|---|---|---|\n")
        served = served_lengths([e["bucket"] for e in entries])
        text += "".join(f"| {e['name']} | {describe_lengths(ranges)} | "
                        f"{'their own length' if e['bucket'].get('natural_length') else e['bucket']['seq_len']} |\n"
                        for e, ranges in zip(entries, served))
    return text
