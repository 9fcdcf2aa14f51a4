"""Under CI a missing test dependency fails; elsewhere it skips."""

from __future__ import annotations

import pytest

from requires import import_or_skip, skip_or_fail


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception), ("false", pytest.skip.Exception)])
def test_missing_dependencies_fail_under_ci_and_skip_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no_such_module_for_tokenfuse"):
        import_or_skip("no_such_module_for_tokenfuse")
    with pytest.raises(outcome, match="cmake is missing"):
        skip_or_fail("cmake is missing")


def test_present_modules_import():
    assert import_or_skip("json").dumps([1]) == "[1]"
