"""TensorRT access: the full `tensorrt` module when importable, TensorRT-RTX otherwise.

TensorRT-RTX builds engines ahead of time on machines without a GPU, so CI builds real engines.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..exporter.errors import UsageError


def load_tensorrt():
    """(module, flavour): `tensorrt` if importable, else `tensorrt_rtx`."""
    for name, flavour in (("tensorrt", "TensorRT"), ("tensorrt_rtx", "TensorRT-RTX")):
        try:
            return importlib.import_module(name), flavour
        except ImportError:
            continue
    raise UsageError("no TensorRT found: pip install tensorrt (GPU machines) or tensorrt-rtx-cu13 (builds on any machine)")


def build_serialized(onnx_path: str | Path, batch: tuple[int, int, int] = (1, 8, 32), trt=None) -> bytes:
    """Parse `onnx_path` and build an engine with one profile over the batch axis (min, opt, max)."""
    trt = trt or load_tensorrt()[0]
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
        rest = list(tensor.shape)[1:]
        profile.set_shape(tensor.name, *([b] + rest for b in batch))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UsageError(f"{onnx_path}: TensorRT could not build an engine (see the log above)")
    return bytes(engine)
