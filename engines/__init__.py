"""Engines: build, run and benchmark token-merged models with TensorRT and ONNX Runtime.

    from tokenfuse.engines import build_engine, load
    build_engine("vit.onnx", "vit.engine", batch=(1, 8, 32))
    outputs = load("vit.onnx").run({"pixel_values": images})
"""

from .build import build_engine
from .runtime import Runner, load

__all__ = ["build_engine", "load", "Runner"]
