"""Element types by the name each system gives them: one table for the runtimes, the engine
sidecar, the KServe v2 protocol and Triton's model configuration."""

from __future__ import annotations

import numpy as np

# NumPy's name: ONNX Runtime's type, TensorRT's name, KServe v2's datatype, Triton's config type
_TABLE = {
    "float32": ("tensor(float)", "float", "FP32", "TYPE_FP32"),
    "float16": ("tensor(float16)", "half", "FP16", "TYPE_FP16"),
    "bfloat16": ("tensor(bfloat16)", "bfloat16", "BF16", "TYPE_BF16"),
    "float64": ("tensor(double)", "double", "FP64", "TYPE_FP64"),
    "int64": ("tensor(int64)", "int64", "INT64", "TYPE_INT64"),
    "int32": ("tensor(int32)", "int32", "INT32", "TYPE_INT32"),
    "int8": ("tensor(int8)", "int8", "INT8", "TYPE_INT8"),
    "bool": ("tensor(bool)", "bool", "BOOL", "TYPE_BOOL"),
}
_ALIASES = {alias: name for name, row in _TABLE.items() for alias in (name, *row)}


def numpy_name(name: str) -> str:
    """A type as NumPy (and torch) name it, from any system's name for it; unknown names unchanged."""
    return _ALIASES.get(name, name)


def kserve_type(name: str) -> str:
    return _TABLE[numpy_name(name)][2]


def triton_type(name: str) -> str:
    return _TABLE[numpy_name(name)][3]


def from_kserve(datatype: str) -> np.dtype:
    return np.dtype(numpy_name(datatype))
