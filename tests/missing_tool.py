"""One rule for a test that lacks a tool (a C++ compiler, a sanitizer runtime, nvcc, CMake):
skipped with the reason on an ordinary machine, a failure under CI (CI=true), so CI never skips
silently."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_tool(reason: str):
    """Skip (or, under CI, fail) the calling test because `reason` names a missing tool."""
    if in_ci():
        pytest.fail(f"CI lacks a tool this test needs: {reason}", pytrace=False)
    pytest.skip(reason)
