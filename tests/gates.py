"""The validation gate tests hold exports to: what is measured with their fixed seeds, not the
production tolerance (fp32: every merge decision agrees, outputs within 1e-4)."""


def assert_validated_exactly(manifest: dict, max_abs_error: float = 1e-4) -> dict:
    validation = manifest["validation"]
    assert validation["passed"] and validation["merge_agreement"] == 1.0 and validation["max_abs_error"] <= max_abs_error, validation
    return validation
