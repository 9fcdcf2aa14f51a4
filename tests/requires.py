"""Skips that CI does not allow. Under CI (the `CI` environment variable, which .ci/run sets) a
missing dependency fails the test instead of skipping it, so CI cannot pass with a check left out.
Elsewhere (a developer's machine without, say, cmake) the test skips with the reason."""

from __future__ import annotations

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str):
    """Skip the calling test because `reason` names a missing tool or package; fail it under CI."""
    if in_ci():
        pytest.fail(f"CI must run this test, but {reason}", pytrace=False)
    pytest.skip(reason)


def import_or_skip(name: str):
    """`pytest.importorskip`, failing under CI."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_or_fail(f"{name} cannot be imported ({exc})")
