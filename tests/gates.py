"""The validation gate tests hold fp32 exports to, stricter than the production tolerance: every
merge decision right up to near-ties (which side of a near-tie a CPU lands on is not pinned),
outputs with the same decisions within 1e-4."""


def assert_validated_exactly(manifest: dict, max_abs_error: float = 1e-4) -> dict:
    validation = manifest["validation"]
    assert validation["passed"] and validation["merge_agreement"] == 1.0 and validation["max_abs_error"] <= max_abs_error, validation
    return validation


def validate_under_seeds(adapter, settings, work_dir, seeds, dtype: str = "fp32") -> list[dict]:
    """Trace the merged model once, as `tokenfuse export` does, and validate that graph under each seed."""
    import dataclasses

    from tokenfuse.exporter import onnx_export

    settings = dataclasses.replace(settings, attention="explicit")  # what export_onnx traces
    path = work_dir / f"traced-{settings.method.name}.onnx"
    onnx_export.trace(adapter, settings, path, onnx_export.DEFAULT_OPSET)
    return [onnx_export.validate(adapter, settings, path, seed=seed, dtype=dtype) for seed in seeds]
