"""TensorRT access: the full `tensorrt` module when importable, TensorRT-RTX otherwise.

TensorRT-RTX builds engines ahead of time on machines without a GPU, so CI builds real engines.
"""

from __future__ import annotations

import importlib

from ..exporter.errors import UsageError


def load_tensorrt():
    """(module, flavour): `tensorrt` if importable, else `tensorrt_rtx`."""
    for name, flavour in (("tensorrt", "TensorRT"), ("tensorrt_rtx", "TensorRT-RTX")):
        try:
            return importlib.import_module(name), flavour
        except ImportError:
            continue
    raise UsageError("no TensorRT found: pip install tensorrt (GPU machines) or tensorrt-rtx-cu13 (builds on any machine)")
