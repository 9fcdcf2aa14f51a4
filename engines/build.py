"""`tokenfuse build`: a TensorRT engine from an exported model, with a sidecar manifest.

The sidecar (`vit.engine.json`) says what the engine needs at run time: the TensorRT flavour and
version, the GPUs it targets, the plugin library (by hash), its bindings, and the export manifest
it came from. The runtime checks it before it deserialises anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from .. import __version__
from ..exporter.buckets import bucket_file, describe_lengths, refuse_length_adaptive, served_lengths
from ..exporter.errors import UsageError
from ..exporter.files import atomic_outputs
from ..exporter.manifest import Manifest
from ..exporter.plugin_lowering import OP_TYPE
from .dtypes import numpy_name
from .tensorrt import load_tensorrt


def parse_batch(text: str) -> tuple[int, int, int]:
    """`1:8:32` (min:opt:max) or a single size."""
    try:
        sizes = tuple(int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--batch {text!r}: give min:opt:max batch sizes, e.g. 1:8:32")
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or not 1 <= sizes[0] <= sizes[1] <= sizes[2]:
        raise UsageError(f"--batch {text!r}: give 1 <= min <= opt <= max, e.g. 1:8:32")
    return sizes


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_timing_cache(flavour: str, version: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenfuse"
    return root / f"timing-{flavour.lower()}-{version}.cache"


def _uses_custom_ops(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(node.op_type == OP_TYPE for node in model.graph.node)


def _load_plugins(trt, plugins: str | None, onnx_path: Path) -> dict | None:
    """Load the plugin library when given (or, with `auto`, when the model needs it)."""
    if plugins in (None, "none"):
        return None
    if plugins == "auto":
        if not _uses_custom_ops(onnx_path):
            return None
        from ..plugins import library_path

        library = library_path()
        if library is None:
            raise UsageError(
                f"{onnx_path} has tokenfuse plugin nodes but no plugin library was found; "
                "run `tokenfuse plugin build`, pass --plugins PATH, or export with --lowering onnx"
            )
    else:
        library = Path(plugins)
    if not library.is_file():
        raise UsageError(f"--plugins {plugins}: no such file")
    try:
        trt.get_plugin_registry().load_library(str(library))
    except Exception as exc:
        raise UsageError(f"--plugins {plugins}: TensorRT could not load it ({exc})")
    return {"path": str(library.resolve()), "sha256": file_sha256(library)}


# Run in a child process: TensorRT-RTX may abort the whole process while importing a plugin node.
_PARSE_WITH_PLUGIN = """
import sys, tensorrt_rtx as trt
trt.get_plugin_registry().load_library(sys.argv[1])
logger = trt.Logger(trt.Logger.INFO)
builder = trt.Builder(logger)
network = builder.create_network(0)
parser = trt.OnnxParser(network, logger)
sys.exit(0 if parser.parse_from_file(sys.argv[2]) else 3)
"""


def parse_with_plugin(onnx_path: Path, library: Path) -> subprocess.CompletedProcess:
    """Parse `onnx_path` with TensorRT-RTX and `library` loaded, in a child process."""
    return subprocess.run([sys.executable, "-c", _PARSE_WITH_PLUGIN, str(library), str(onnx_path)], capture_output=True, text=True)


def _check_plugin_import(onnx_path: Path, library: Path, version: str) -> None:
    """TensorRT-RTX 1.7 without a GPU finds and creates the plugin, then aborts (std::terminate)
    inside its ONNX parser before adding the layer (plugins/README.md): turn that into an error."""
    done = parse_with_plugin(onnx_path, library)
    if done.returncode < 0:
        raise UsageError(
            f"TensorRT-RTX {version} aborted (signal {-done.returncode}) while importing the SimilarityEnergyMerge "
            "plugin node, after it had created the plugin; build this model with full TensorRT (pip install tensorrt "
            "on a GPU machine), or export it with --lowering onnx"
        )


def _bindings(network) -> list[dict]:
    tensors = [("input", network.get_input(i)) for i in range(network.num_inputs)]
    tensors += [("output", network.get_output(i)) for i in range(network.num_outputs)]
    return [{"name": t.name, "io": io, "dtype": numpy_name(str(t.dtype).split(".")[-1].lower()), "shape": list(t.shape)}
            for io, t in tensors]


def _targets(trt, config, flavour: str) -> dict:
    if flavour == "TensorRT-RTX":
        count = config.num_compute_capabilities
        chosen = [str(config.get_compute_capability(i)).split(".")[-1] for i in range(count)]
        supported = [name for name in trt.ComputeCapability.__members__ if name.startswith("SM")]
        return {"compute_capabilities": chosen or supported, "note": "TensorRT-RTX ahead-of-time build"}
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"gpu": torch.cuda.get_device_name(), "compute_capabilities": [f"SM{major}{minor}"]}
    except ImportError:
        pass
    return {"gpu": "the GPU this engine was built on", "compute_capabilities": []}


def compile_engine(
    onnx_path: str | Path,
    *,
    batch: tuple[int, int, int] = (1, 8, 32),
    lengths: tuple[int, int, int] | None = None,
    plugins: str | None = "auto",
    timing_cache: str | Path | None = None,
    export_manifest: Manifest | None = None,
    log=print,
) -> tuple[bytes, dict]:
    """Parse and build one graph with one profile over the batch axis (and, for a graph with a
    dynamic token axis, over `lengths`): (engine bytes, sidecar). `export_manifest` defaults to
    the one beside `onnx_path`."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UsageError(f"{onnx_path}: no such file; export one with tokenfuse export")
    if export_manifest is None:
        export_manifest = Manifest.beside(onnx_path)
        refuse_length_adaptive(export_manifest, onnx_path, "compile_engine (use build_engine)")
    trt, flavour = load_tensorrt()
    log(f"[1/3] parsing {onnx_path} with {flavour} {trt.__version__}")
    plugin = _load_plugins(trt, plugins, onnx_path)
    if plugin is not None and flavour == "TensorRT-RTX":
        _check_plugin_import(onnx_path, Path(plugin["path"]), trt.__version__)

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise UsageError(f"{onnx_path}: TensorRT's ONNX parser rejected the model: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.shape[0] != -1:
            raise UsageError(f"{onnx_path}: input {tensor.name} has no dynamic batch axis; export it with tokenfuse export")
        rest = list(tensor.shape)[1:]
        if -1 in rest and lengths is None:
            raise UsageError(f"{onnx_path}: input {tensor.name} has a dynamic token axis; give lengths=(min, opt, max) for its profile")
        profile.set_shape(tensor.name, *([b] + [length if d == -1 else d for d in rest] for b, length in zip(batch, lengths or batch)))
    config.add_optimization_profile(profile)

    cache_path = None
    if flavour == "TensorRT":  # TensorRT-RTX has no timing cache (its cache calls are no-ops)
        cache_path = Path(timing_cache) if timing_cache else default_timing_cache(flavour, trt.__version__)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=True)

    shape = f"batch {batch[0]}:{batch[1]}:{batch[2]}" + (f", length {lengths[0]}:{lengths[1]}:{lengths[2]}" if lengths else "")
    log(f"[2/3] building for {shape} (timing cache: {cache_path or 'none in ' + flavour})")
    started = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UsageError(f"{onnx_path}: {flavour} could not build an engine; run with TOKENFUSE_DEBUG=1 for its log")
    seconds = time.time() - started
    log(f"      built in {seconds:.1f}s, {serialized.nbytes / 2**20:.1f} MiB")

    sidecar = {
        "tokenfuse_version": __version__,
        "tensorrt": {"flavour": flavour, "module": trt.__name__, "version": trt.__version__},
        "target": _targets(trt, config, flavour),
        "batch_profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
        "length_profile": {"min": lengths[0], "opt": lengths[1], "max": lengths[2]} if lengths else None,
        "build_seconds": round(seconds, 2),
        "plugin_library": plugin,
        "timing_cache": str(cache_path) if cache_path else None,
        "bindings": _bindings(network),
        "onnx": {"path": str(onnx_path.resolve()), "sha256": file_sha256(onnx_path)},
        "export_manifest": export_manifest.to_json() if export_manifest else None,
        "built_on": {"machine": platform.machine(), "python": platform.python_version()},
    }
    if cache_path:
        with atomic_outputs(cache_path) as (tmp_cache,):
            tmp_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), sidecar


def build_engine(onnx_path: str | Path, output: str | Path, *, log=print, **options) -> dict:
    """Build `output` (.engine) and its sidecar `output + .json`; return the sidecar. A
    length-adaptive export gets one engine per bucket (see build_bucket_engines).

    `options` are compile_engine's: batch, plugins, timing_cache."""
    onnx_path, output = Path(onnx_path), Path(output)
    manifest = Manifest.beside(onnx_path) if onnx_path.is_file() else None
    if manifest is not None and manifest.length_adaptive:
        return build_bucket_engines(onnx_path, manifest, output, log=log, **options)
    engine, sidecar = compile_engine(onnx_path, log=log, **options)
    log(f"[3/3] writing {output} and {output.name}.json")
    with atomic_outputs(output, sidecar_path(output)) as (tmp_engine, tmp_sidecar):
        tmp_engine.write_bytes(engine)
        tmp_sidecar.write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def build_bucket_engines(onnx_path: Path, manifest: Manifest, output: Path, *, log=print, **options) -> dict:
    """One engine per bucket of a length-adaptive export, named as its graphs are (`NAME.engine`
    the longest, `NAME.lenL.engine`, `NAME.natural.engine`, each with its sidecar): the merged
    buckets at their static length, the natural-length graph with a profile over 1..its limit.
    The top sidecar lists the buckets, so the runtime picks an engine per text as it picks a graph.
    Nothing is written unless every bucket builds."""
    buckets, longest = manifest.buckets, manifest.buckets[-1]["seq_len"]
    engines = [bucket_file(output.with_suffix(".onnx"), None if b["natural_length"] else b["seq_len"], longest).with_suffix(".engine")
               for b in buckets]
    if len(buckets) == 1:  # an unmerged export: its one graph is the model
        engines = [output]
    shared = {key: value for key, value in manifest.to_json().items() if key != "buckets"}
    sidecars, started = [], time.time()
    with atomic_outputs(*engines, *map(sidecar_path, engines)) as temps:
        for step, (bucket, served, engine, tmp) in enumerate(zip(buckets, served_lengths(buckets), engines, temps), 1):
            limit = bucket["seq_len"]
            log(f"engine {step}/{len(buckets)}: texts of {describe_lengths(served)} tokens" + (" at their natural length" if bucket["natural_length"] else f", at {limit}"))
            lengths = (1, -(-served[0][1] // 2), limit) if bucket["natural_length"] else None  # opt: amid the shortest texts, the most common
            blob, sidecar = compile_engine(onnx_path.with_name(bucket["file"]), lengths=lengths, export_manifest=Manifest.from_json({**shared, **bucket}),
                                           log=log, **options)
            tmp.write_bytes(blob)
            sidecars.append(sidecar)
        top = sidecars[-1] | {"export_manifest": manifest.to_json(),
                              "buckets": [{**bucket, "file": engine.name} for bucket, engine in zip(buckets, engines)]}
        for sidecar, tmp in zip(sidecars[:-1] + [top], temps[len(engines):]):
            tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
        sizes = sum(tmp.stat().st_size for tmp in temps[: len(engines)])
        log(f"writing {len(engines)} engine{'s' * (len(engines) > 1)} ({sizes / 2**20:.0f} MiB) and their sidecars, "
            f"built in {time.time() - started:.0f}s")
    return top


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")
