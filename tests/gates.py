"""The validation gate tests hold fp32 exports to, stricter than the production tolerance: every
merge decision right up to near-ties (which side of a near-tie a CPU lands on is not pinned),
outputs with the same decisions within 1e-4."""


def assert_validated_exactly(manifest: dict, max_abs_error: float = 1e-4) -> dict:
    validation = manifest["validation"]
    assert validation["passed"] and validation["merge_agreement"] == 1.0 and validation["max_abs_error"] <= max_abs_error, validation
    return validation

