"""Under CI a missing test dependency fails (elsewhere it skips) and the slow tests run."""

from __future__ import annotations

from types import SimpleNamespace

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


@pytest.mark.xdist_group("grouping-check")
def test_xdist_groups_reach_the_scheduler(request):
    """scripts/test.sh keeps the tests of one xdist_group on one worker, which makes each shared
    export once: pytest-xdist tags the node id with the group. A pytest release it cannot tag
    (pytest 9.2 with pytest-xdist 3.8) scatters the groups silently and repeats every shared export."""
    if not request.config.getoption("loadgroup", default=False):
        pytest.skip("checks the --dist loadgroup run of scripts/test.sh")
    assert request.node.nodeid.endswith("@grouping-check"), request.node.nodeid


@pytest.mark.parametrize("ci, options, kept", [
    ("true", {}, ["fast", "slow"]),  # CI runs everything
    ("", {"--slow": True}, ["fast", "slow"]),
    ("", {"-m": "slow"}, ["fast", "slow"]),  # -m decides for itself (pytest applies it next)
    ("", {}, ["fast"]),
])
def test_slow_tests_run_under_ci_with_slow_or_when_asked_for(monkeypatch, ci, options, kept):
    from conftest import pytest_collection_modifyitems

    monkeypatch.setenv("CI", ci)
    deselected = []
    config = SimpleNamespace(getoption=lambda name: options.get(name, False if name == "--slow" else ""),
                             hook=SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
    items = [SimpleNamespace(name=name, get_closest_marker=lambda marker, name=name: marker == name == "slow" or None)
             for name in ("fast", "slow")]
    pytest_collection_modifyitems(config, items)
    assert [item.name for item in items] == kept
    assert [item.name for item in deselected] == (["slow"] if kept == ["fast"] else [])
