"""The one-call GPU check (scripts/gpu_check.sh) rehearsed on the CPU: its dry mode runs every step's
CPU path at tiny sizes or reports 'no CUDA', within the device tool's limits on what comes back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["versions", "plugin-correctness", "plugin-timing", "torch-models", "sanitizers", "torch-compile"]
RUNBOOK_COMMAND = "bash scripts/gpu_check.sh"


@pytest.mark.slow  # about 40 s: two tiny models timed and one compiled
def test_dry_run_writes_every_step_within_the_device_limits(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DEADLINE": "300"})
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["gpu-check.json", "gpu-check.log", "gpu-check.md"]  # the device tool returns at most 8 files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert sum(p.stat().st_size for p in out.iterdir()) < 16 << 20
    report = json.loads((out / "gpu-check.json").read_text())
    assert list(report["steps"]) == STEPS and report["dry"]
    statuses = {name: step["status"] for name, step in report["steps"].items()}
    assert statuses == {"versions": "ok", "plugin-correctness": "no CUDA", "plugin-timing": "no CUDA", "torch-models": "ok",
                        "sanitizers": "no CUDA", "torch-compile": "ok"}, report
    bench = report["steps"]["torch-models"]["report"]
    assert [m["name"] for m in bench["models"]] == ["vit-b", "minilm"] and all(len(m["rows"]) == 2 for m in bench["models"])
    assert report["steps"]["torch-compile"]["report"]["models"][0]["rows"][0]["recompiled_while_timing"] is None
    assert "| torch-models | ok |" in (out / "gpu-check.md").read_text()
    assert "vit-b eager B=1" in (out / "gpu-check.log").read_text()


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    run = gpu_check.Run(tmp_path, dry=True, deadline=gpu_check.Deadline(60))

    def broken(stop, partial, budget):
        partial({"measured": [1]})
        raise RuntimeError("planted")

    run.step("plugin-timing", broken)
    run.step("versions", gpu_check.versions)
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["steps"]["plugin-timing"]["status"] == "error" and "planted" in report["steps"]["plugin-timing"]["error"]
    assert report["steps"]["plugin-timing"]["measured"] == [1]  # what it had measured is kept
    assert report["steps"]["versions"]["status"] == "ok"
    late = gpu_check.Run(tmp_path, dry=True, deadline=gpu_check.Deadline(1))
    late.step("versions", gpu_check.versions)
    assert late.report["steps"]["versions"] == {"status": "skipped", "reason": "out of time"}


def test_the_runbook_call_fits_the_device_tool():
    runbook = (ROOT / "docs" / "gpu-runbook.md").read_text()
    assert RUNBOOK_COMMAND in runbook and len(RUNBOOK_COMMAND) < 2000
    assert "timeout_s" in runbook
