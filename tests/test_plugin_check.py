"""`tokenfuse plugin check` (tokenfuse.plugins.gpu_check) cannot run its kernels here (no GPU); its
pure parts can: the slot gate, the timing loop and the report it writes."""

from __future__ import annotations

import pytest
import torch

from tokenfuse.cli import main
from tokenfuse.exporter import methods
from tokenfuse.exporter.agreement import Decision
from tokenfuse.exporter.methods import LayerRule, match_step
from tokenfuse.plugins import gpu_check as harness

def _decision(rule, metric, r, protected=1):
    plan = match_step(rule, metric, r, protected=protected)
    return Decision(rule, metric, r, protected, None, None, None, plan.dst_slot)


def test_gate_excuses_near_ties_only_where_inputs_are_not_exact_ties():
    """Two B tokens a rounding error apart: either partner is right on random inputs, but on the
    exact-tie inputs (which test the tie-breaking itself) only PyTorch's; a far-off partner fails."""
    close = torch.ones(1, 6, 2)
    close[0, :, 1] = torch.tensor([0.0, 0.5, 0.5, 0.5 + 1e-7, 2.0, 3.0])  # A token 2 sees B tokens 1 and 3 almost alike
    decision = _decision(LayerRule("tome"), close, 1, protected=0)
    want = decision.slots
    assert want[0, [0, 4, 1, 3, 5]].tolist() == [0, 1, 2, 3, 4] and int(want[0, 2]) in (2, 3)  # token 2 merges into 1 or 3
    flipped = want.clone()
    flipped[0, 2] = 5 - want[0, 2]  # into the other near-tied partner
    gate = harness.slot_gate(decision, flipped, exact=False)
    assert gate == {"tokens": 6, "identical": 5, "excused": 1, "wrong": 0, "passed": True}
    assert not harness.slot_gate(decision, flipped, exact=True)["passed"]
    far = want.clone()
    far[0, 2] = want[0, 5]  # B token 5 (cosine 0.71 with token 2) is far less similar
    assert harness.slot_gate(decision, far, exact=False)["wrong"] == 1


def test_gate_catches_a_wrong_kernel_on_random_inputs():
    """A kernel that merges into the least similar partner fails; the old gate excused every random case."""
    metric = torch.randn(4, 197, 64, generator=torch.Generator().manual_seed(0))
    rule = LayerRule("pitome", margin=0.675)
    decision = _decision(rule, metric, 60)
    real = methods.best_partner
    try:
        methods.best_partner = lambda sim, bias: (sim - bias.unsqueeze(-2)).argmin(-1)  # the least similar candidate
        wrong = match_step(rule, metric, 60).dst_slot
    finally:
        methods.best_partner = real
    gate = harness.slot_gate(decision, wrong, exact=False)
    assert not gate["passed"] and gate["wrong"] >= 4 * 60 * 0.9, gate


def test_report_holds_every_row_and_the_environment():
    environment = {"device": "NVIDIA H100", "driver": "580.1", "CUDA (torch)": "13.0", "torch": "2.11"}
    correctness = [{"inputs": "random", "method": "pitome", "variant": "plain", "dtype": "float16", "n": 1024, "d": 64,
                    "tokens": 8192, "identical": 8150, "excused": 42, "wrong": 0, "max_rel_error": 3e-3, "passed": True}]
    timings = [{"method": "tome", "variant": "plain", "batch": 64, "n": 197, "d": 64, "r": 24, "kernel_ms": 0.012, "pytorch_ms": 0.09, "block_ms": 0.3,
                "launch": {"blocks_per_image": 2}},
               {"method": "pitome", "variant": "plain", "batch": 1, "n": 197, "d": 64, "r": 24, "kernel_error": "RuntimeError: capture", "pytorch_ms": 0.03,
                "block_ms": 0.05}]
    text = harness.markdown_report(environment, correctness, timings, {"racecheck": {"returncode": 0, "summary": "ERROR SUMMARY: 0 errors"}},
                                   "tokenfuse plugin check --sanitize")
    for expected in ("NVIDIA H100", "580.1", "| torch | 2.11 |", "| random | pitome | plain | float16 | 1024 | 64 | 8192 | 8150 | 42 | 0 | 3.00e-03 | yes |",
                     "| tome | plain | 64 | 197 | 64 | 24 | 2 | 0.0120 | 0.0900 | 0.3000 | 4.0% | 30.0% |",
                     "| pitome | plain | 1 | 197 | 64 | 24 | n/a | RuntimeError: capture | 0.0300 | 0.0500 | n/a | 60.0% |", "| racecheck | 0 | ERROR SUMMARY: 0 errors |",
                     "`tokenfuse plugin check --sanitize`"):
        assert expected in text


def test_without_a_gpu_it_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run tokenfuse plugin check itself")
    assert main(["plugin", "check", "--report", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and not (tmp_path / "r.md").exists()
    assert main(["plugin", "check", "--library", str(tmp_path / "none.so")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["plugin", "check", "--library", str(tmp_path / "none.so"), "--build-dir", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


def test_timing_loop_times_every_method_and_records_failures(monkeypatch):
    """The timing loop on the CPU with a stand-in for the CUDA-graph timer: every method gets a
    PyTorch-merge time beside the block's, and a kernel that fails is recorded, not fatal."""
    calls = []

    def stand_in(fn, feeds):
        fn(feeds[0])
        calls.append(len(feeds))
        return {"median_ms": 1.0}

    class Failing:
        def plan(self, batch, n):
            return {"blocks_per_image": 1}

        def merge(self, *args, **kwargs):
            raise RuntimeError("no kernel here")

    monkeypatch.setattr(harness, "graph_ms", stand_in)
    monkeypatch.setattr(harness, "feeds_past_l2", lambda make, size: [make(0), make(1)])
    monkeypatch.setattr(harness, "model_block", lambda: torch.nn.Identity())
    rows = harness.timings(Failing(), shapes=((17, 2),), device="cpu")
    assert [(row["method"], row["variant"]) for row in rows] == harness.CASES
    assert all(row["pytorch_ms"] == 1.0 and row["kernel_error"].startswith("RuntimeError") and row["launch"] for row in rows)
    assert harness.markdown_report({}, [], rows, {}, "x").count("| n/a |") == len(rows)
