"""tokenfuse: export token-merged transformer encoders to validated, TensorRT-ready ONNX."""

__version__ = "0.1.0"
