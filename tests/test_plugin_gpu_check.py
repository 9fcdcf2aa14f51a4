"""The GPU harness (scripts/plugin_gpu_check.py) cannot run here (no GPU); its pure parts can: the
near-tie gate and the report it writes to docs/plugin-gpu.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reference
from tokenfuse.exporter.methods import LayerRule

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plugin_gpu_check.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("plugin_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gate_excludes_only_near_ties_and_counts_them(harness):
    want = np.array([[0, 1, 2, 1], [0, 1, 2, 2], [0, 1, 1, 2]])
    got = want.copy()
    got[1, 3] = 1  # differs in a near-tie element: left out, counted
    gate = harness.slot_gate(got, want, near=np.array([False, True, False]))
    assert gate == {"elements": 3, "near_tie_elements": 1, "differing_elements": 1, "differing_outside_near_ties": 0, "passed": True}
    got[2, 2] = 2  # differs where the keys were far apart: fails
    assert not harness.slot_gate(got, want, near=np.array([False, True, False]))["passed"]


def test_near_ties_found_by_the_float64_reference(harness):
    """Two tokens whose best matches differ by about 1e-7 are a near tie; well-separated data is not."""
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((1, 9, 4)).astype(np.float32) * np.arange(1, 10)[None, :, None]
    close = np.zeros((1, 5, 2), np.float32)
    close[0, :, 0] = 1.0
    close[0, :, 1] = [0.0, 0.5, 1.0, 0.5 + 1e-7, 3.0]  # B tokens 1 and 3 almost alike
    rule = LayerRule("tome")
    assert harness.near_tie_elements(reference, rule, close, 1, 0, None, bound=1e-5).tolist() == [True]
    assert harness.near_tie_elements(reference, rule, close, 1, 0, None, bound=1e-12).tolist() == [False]
    nan = wide.copy()
    nan[0, 2, 0] = np.nan
    assert harness.near_tie_elements(reference, rule, nan, 2, 1, None).tolist() == [False]


def test_report_holds_every_row_and_the_environment(harness):
    environment = {"device": "NVIDIA H100", "driver": "580.1", "CUDA (torch)": "13.0", "torch": "2.11"}
    correctness = [{"inputs": "random", "method": "pitome", "variant": "plain", "dtype": "float16", "n": 1024, "d": 64,
                    "elements": 8, "near_tie_elements": 2, "differing_elements": 1, "differing_outside_near_ties": 0,
                    "max_rel_error": 3e-3, "passed": True}]
    timings = [{"method": "tome", "variant": "plain", "batch": 64, "n": 197, "d": 64, "merge_ms": 0.012, "block_ms": 0.3}]
    text = harness.markdown_report(environment, correctness, timings, {"racecheck": {"returncode": 0, "summary": "ERROR SUMMARY: 0 errors"}},
                                   "python scripts/plugin_gpu_check.py --sanitize")
    for expected in ("NVIDIA H100", "580.1", "| torch | 2.11 |", "| random | pitome | plain | float16 | 1024 | 64 | 8 | 2 | 1 (0) | 3.00e-03 | yes |",
                     "| tome | plain | 64 | 197 | 64 | 0.0120 | 0.3000 | 4.0% |", "| racecheck | 0 | ERROR SUMMARY: 0 errors |",
                     "`python scripts/plugin_gpu_check.py --sanitize`"):
        assert expected in text


def test_without_a_gpu_it_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run the harness itself")
    done = subprocess.run([sys.executable, str(SCRIPT), "--report", str(tmp_path / "r.md")], capture_output=True, text=True)
    assert done.returncode == 1 and "no CUDA device" in done.stderr and not (tmp_path / "r.md").exists()
