"""The export manifest (NAME.json beside NAME.onnx): what was exported, how, and what the graph
takes and gives. `export` writes it; every engine command reads it through `Manifest`, so a
missing key or a manifest from a newer tokenfuse fails in one place with one message."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

# 1: manifests without one were written before it existed and read as version 1; 2: each bucket of a
# length-adaptive export lists the text lengths it runs (`lengths`), which a version-1 reader would misroute
SCHEMA_VERSION = 2
REQUIRED = ("model", "family", "method", "inputs", "outputs")


@dataclass
class Manifest:
    """An export manifest. `buckets` (a length-adaptive text export) lists one entry per graph,
    with its own file, length, method, schedule, bindings and validation; `extra` keeps keys this
    version does not know, so a round trip loses nothing."""

    model: str
    family: str
    method: str
    inputs: list[dict]
    outputs: list[dict]
    settings: dict = field(default_factory=dict)
    schedule: list[int] | None = None
    budget: dict | None = None
    preprocess: dict | None = None
    pooling: dict | None = None
    opset: int | None = None
    dtype: str = "fp32"
    lowering: str = "onnx"
    plugin: dict | None = None
    validation: dict | None = None
    natural_length: bool = False  # the unmerged graph with a dynamic sequence axis
    buckets: list[dict] | None = None
    weights: dict | None = None  # the external-data file the graphs share
    tokenfuse_version: str | None = None
    exported_with: dict | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    read_keys: tuple = field(default=(), repr=False, compare=False)  # the keys it was read with, in order

    @property
    def length_adaptive(self) -> bool:
        return bool(self.buckets)

    @property
    def flops_ratio(self) -> float | None:
        """The transformer layers' FLOPs against the unmerged model's (the export's budget)."""
        return (self.budget or {}).get("flops_ratio")

    @classmethod
    def from_json(cls, data: dict, source: str = "the manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise UsageError(f"{source}: not a tokenfuse export manifest (a JSON object); re-export the model with tokenfuse export")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UsageError(f"{source}: manifest schema {version!r} is newer than this tokenfuse reads ({SCHEMA_VERSION}); upgrade tokenfuse")
        missing = [key for key in REQUIRED if key not in data]
        if missing:
            raise UsageError(f"{source}: not a tokenfuse export manifest (no {', '.join(missing)}); re-export the model with tokenfuse export")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "read_keys"}
        return cls(**{k: v for k, v in data.items() if k in known} | {"schema_version": version}, extra={k: v for k, v in data.items() if k not in known},
                   read_keys=tuple(data))

    def to_json(self) -> dict:
        """The keys it was read with (so a round trip gives the same JSON), then any field set since."""
        fields = {f.name: f for f in dataclasses.fields(self) if f.name not in ("extra", "read_keys")}
        data = {key: self.extra[key] if key in self.extra else getattr(self, key) for key in self.read_keys}
        for name, f in fields.items():
            value = getattr(self, name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if name not in data and (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING or value != default):
                data[name] = value
        return {**data, **self.extra}

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """The manifest at `path` (the .json, or the .onnx beside it)."""
        path = Path(path)
        path = path.with_suffix(".json") if path.suffix == ".onnx" else path
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UsageError(f"{path}: not a readable export manifest; give the .json that tokenfuse export wrote") from None
        return cls.from_json(data, str(path))

    @classmethod
    def beside(cls, onnx_path: Path) -> "Manifest | None":
        """The manifest beside an .onnx, or None where there is none (a graph from elsewhere, whose
        .json, if any, is someone else's: not a JSON object with tokenfuse's version keys)."""
        path = Path(onnx_path).with_suffix(".json")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not ({"schema_version", "tokenfuse_version"} & set(data)):
            return None
        return cls.from_json(data, str(path))
