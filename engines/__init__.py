"""Engines: build and run token-merged models with TensorRT and ONNX Runtime."""
