"""`tokenfuse triton-repo`: a Triton Inference Server model repository for a tokenfuse model.

Layout written:
    REPO/NAME/config.pbtxt      platform, batching, instance groups, inputs and outputs
    REPO/NAME/1/model.onnx      (or model.plan for a TensorRT engine)
    REPO/NAME/tokenfuse.json    the export manifest (and the engine sidecar)
    REPO/README.md              how to start Triton on it, including plugin preloading
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..exporter.buckets import refuse_length_adaptive
from ..exporter.errors import UsageError
from .build import sidecar_path

TRITON_TYPES = {"float32": "TYPE_FP32", "float": "TYPE_FP32", "float16": "TYPE_FP16", "half": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def _tensors(entries: list[dict]) -> str:
    blocks = []
    for entry in entries:
        dims = ", ".join(str(d) for d in entry["shape"][1:])
        blocks.append(f'  {{\n    name: "{entry["name"]}"\n    data_type: {TRITON_TYPES[entry["dtype"]]}\n    dims: [ {dims} ]\n  }}')
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


def write_repository(
    model: str | Path,
    output: str | Path,
    *,
    name: str | None = None,
    max_batch: int = 32,
    instances: int = 1,
    kind: str = "gpu",
    delay_us: int = 5000,
) -> Path:
    """Write the repository for `model` (.onnx or .engine) under `output`; return the model folder."""
    model, output = Path(model), Path(output)
    if not model.is_file():
        raise UsageError(f"{model}: no such file")
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"{output} exists and is not empty; give a new directory")
    name = name or model.stem
    if model.suffix == ".onnx":
        manifest_file = model.with_suffix(".json")
        if not manifest_file.is_file():
            raise UsageError(f"{model}: no manifest beside it; triton-repo needs the .json that tokenfuse export writes")
        manifest = json.loads(manifest_file.read_text())
        refuse_length_adaptive(manifest, model, "tokenfuse triton-repo")
        platform, file_name, sidecar = "onnxruntime_onnx", "model.onnx", None
        inputs, outputs = manifest["inputs"], manifest["outputs"]
    elif model.suffix in (".engine", ".plan"):
        sidecar_file = sidecar_path(model)
        if not sidecar_file.is_file():
            raise UsageError(f"{model}: no sidecar {sidecar_file.name}; build the engine with tokenfuse build")
        sidecar = json.loads(sidecar_file.read_text())
        manifest = sidecar.get("export_manifest") or {}
        platform, file_name = "tensorrt_plan", "model.plan"
        inputs = [b for b in sidecar["bindings"] if b["io"] == "input"]
        outputs = [b for b in sidecar["bindings"] if b["io"] == "output"]
        max_batch = min(max_batch, sidecar["batch_profile"]["max"])
    else:
        raise UsageError(f"{model}: give an .onnx or an .engine")
    if max_batch < 1 or instances < 1:
        raise UsageError("--max-batch and --instances must be >= 1")

    staging = Path(tempfile.mkdtemp(prefix=".triton-", dir=output.parent if output.parent.exists() else None))
    try:
        folder = staging / name
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(model, folder / "1" / file_name)
        (folder / "config.pbtxt").write_text(config_text(name, platform, max_batch, inputs, outputs, instances, kind, delay_us))
        (folder / "tokenfuse.json").write_text(json.dumps({"export_manifest": manifest, "engine_sidecar": sidecar}, indent=2) + "\n")
        preload = ""
        library = (sidecar or {}).get("plugin_library")
        if library:
            (folder / "plugins").mkdir()
            shutil.copyfile(library["path"], folder / "plugins" / Path(library["path"]).name)
            preload = f"LD_PRELOAD=$PWD/{output.name}/{name}/plugins/{Path(library['path']).name} "
        (staging / "README.md").write_text(
            f"# Triton model repository for {manifest.get('model', name)} ({manifest.get('method', '?')})\n\n"
            f"    {preload}tritonserver --model-repository=$PWD/{output.name}\n\n"
            + ("The TensorRT plugin library is preloaded with LD_PRELOAD so the plan can deserialise.\n" if preload else "")
            + ("The plan runs only with the TensorRT version and GPU it was built for (see tokenfuse.json).\n" if sidecar else "")
        )
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output / name
