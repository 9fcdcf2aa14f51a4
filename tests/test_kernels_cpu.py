"""The plugin's CUDA kernels, compiled for the CPU through tests/cuda_emulation/, against the
exporter's PyTorch merge (tokenfuse.exporter.methods: match_step + the shared merge).

Only the C entry points of similarityEnergyMergeKernels.h are used, so the tests hold for any
kernels behind them. Inputs:
* exact ties: metric rows of four ones among sixteen zeros, drawn from a few patterns, so every
  cosine is a multiple of 1/4 (exact in fp32 on both sides) and many scores tie; PiToMe at margin 0
  stays on the exact branch of its energy (sums of multiples of 1/4; the Gaussian variant at margin
  0.99, where every affinity is exactly 0 or 1). Slots must be identical.
* random: Gaussian metrics. fp32 kernels and fp32 PyTorch may order two keys differently when
  they are closer than fp32 rounding, so every slot must be right up to near-ties
  (tokenfuse.exporter.agreement at the fp32 export validation's tolerance; excused tokens are
  counted and printed), and the merged tokens must be PyTorch's merge with the kernel's slots.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import emulated_kernels as ek
from requires import skip_or_fail
from tokenfuse.exporter.agreement import judge
from tokenfuse.exporter.onnx_export import TOLERANCES
from tokenfuse.exporter.methods import NON_FINITE_SIMILARITY, LayerRule, cosine_similarity, max_removable, match_step
from tokenfuse.plugins.gpu_check import launch_plan

# One pytest-xdist worker builds the kernels once. The emulation runs a block's threads as fibers on
# one core, under ThreadSanitizer too.
pytestmark = pytest.mark.xdist_group("kernels")

NEAR_TIE = TOLERANCES["fp32"]["near_tie"]  # keys closer than this may order either way in fp32
CUDA_INVALID_CONFIGURATION = 9

RULES = {
    "tome": LayerRule("tome"),
    "turbo": LayerRule("turbo", turbo_weight=2.0),
    "pitome": LayerRule("pitome", margin=0.0),
    "pitome-bsm": LayerRule("pitome", margin=0.0, variant="bsm"),
    # The Gaussian energy always goes through exp(), and sums of inexact values in different orders
    # break mathematical ties either way; at margin 0.99 every affinity of a cosine below 1
    # underflows to exactly 0 (and cosine 1 gives exactly 1), so energies count identical rows.
    "pitome-text": LayerRule("pitome", margin=0.99, variant="text"),
    "crossget": LayerRule("crossget"),
}
# Random inputs: the margins a 12-layer schedule uses early on.
RANDOM_RULES = {
    **RULES,
    "pitome": LayerRule("pitome", margin=0.6, alpha=1.0),
    "pitome-bsm": LayerRule("pitome", margin=0.75, variant="bsm"),
    "pitome-text": LayerRule("pitome", margin=0.45, variant="text"),
}


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernels_cpu")


@pytest.fixture(scope="session")
def cpu_kernels(build_dir):
    if ek.compiler() is None:
        skip_or_fail("no C++ compiler (set CXX, or install g++): the CPU build of the kernels cannot be made")
    return ek.load_library(ek.build_library(build_dir))


def _driver(build_dir: Path, sanitizer: str) -> Path:
    problem = ek.sanitizer_problem(sanitizer)
    if problem:
        skip_or_fail(problem)
    path = build_dir / f"merge_driver_{sanitizer}"
    return path if path.is_file() else ek.build_driver(build_dir, sanitizer)


@pytest.fixture(scope="session")
def plain_driver(build_dir):
    return _driver(build_dir, "none")


@pytest.fixture(scope="session")
def asan_driver(build_dir):
    return _driver(build_dir, "address")


@pytest.fixture(scope="session")
def tsan_driver(build_dir):
    return _driver(build_dir, "thread")


def tie_metric(rng: np.random.Generator, batch: int, n: int, patterns: int = 5) -> np.ndarray:
    """Rows of four ones among sixteen zeros, from a few patterns: cosines are multiples of 1/4."""
    library = np.zeros((patterns, 16), dtype=np.float32)
    for row in library:
        row[rng.choice(16, 4, replace=False)] = 1.0
    return library[rng.integers(0, patterns, (batch, n))]


def tie_case(rule: LayerRule, n: int, r: int, protected: int, rng: np.random.Generator, batch: int = 1):
    # Dyadic CLS attention: Turbo's priority best - w * attention is exact in fp32 on both sides.
    cls_attn = (rng.integers(0, 4, (batch, n)) / 8).astype(np.float32)
    return ek.make_case(rule, r, protected, tie_metric(rng, batch, n), rng=rng, cls_attn=cls_attn)


def check_same(got: ek.MergeResult, want: ek.MergeResult, case: ek.MergeCase, what: str = ""):
    """Slots identical, merged tokens and sizes as PyTorch's."""
    assert got.status == 0, f"{what}: the launch returned cudaError_t {got.status}"
    np.testing.assert_array_equal(got.slots, want.slots, err_msg=what)
    tolerance = dict(rtol=2e-3, atol=2e-3) if case.x.dtype == np.float16 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.x.astype(np.float32), want.x.astype(np.float32), err_msg=what, **tolerance)
    np.testing.assert_allclose(got.size, want.size, rtol=1e-6, err_msg=what)


def check_valid_layout(result: ek.MergeResult, case: ek.MergeCase):
    """Every slot in [0, K) and every one of the K slots used; protected tokens keep theirs."""
    k = case.x.shape[1] - case.r
    assert result.slots.min() >= 0 and result.slots.max() < k
    for row in result.slots:
        assert len(np.unique(row)) == k
        np.testing.assert_array_equal(row[:case.protected], np.arange(case.protected))


def tie_cases() -> list[tuple[str, ek.MergeCase]]:
    """Every method and PiToMe variant: at N 2, 3, 5 every protected count 0/1/2 and every r from 0
    to the maximum; at 197 r = 1, half and the maximum, one protected count each; at 577 (tome,
    pitome, pitome-text) or 1024 (turbo, pitome-bsm, crossget) the maximum r. (A 1024-thread block
    costs about 4.5 us of CPU per thread and barrier on the CPU, so the large sizes get few cases.)"""
    rng = np.random.default_rng(12)
    cases = []
    for index, (name, rule) in enumerate(RULES.items()):
        for n in (2, 3, 5, 197, 577, 1024):
            for protected in (0, 1, 2):
                top = max_removable(rule.name, n, protected)
                if n <= 5:
                    removals = range(top + 1)
                elif n == 197:
                    removals = [[1, top // 2, top][(protected + index) % 3]]
                else:
                    removals = [top] if protected == (index + n) % 3 and n == (577, 1024)[index % 2] else []
                for r in removals:
                    cases.append((f"{name} N={n} protected={protected} r={r}", tie_case(rule, n, r, protected, rng)))
    return cases


def test_exact_ties_match_pytorch(cpu_kernels):
    started, cases = time.perf_counter(), tie_cases()
    for what, case in cases:
        got = ek.run_library(cpu_kernels, case)
        want = ek.torch_merge(case)
        check_same(got, want, case, what=what)
        check_valid_layout(got, case)
    print(f"\n{len(cases)} exact-tie cases identical in {time.perf_counter() - started:.1f} s")


def check_up_to_near_ties(got: ek.MergeResult, case: ek.MergeCase, what: str = "") -> int:
    """Every slot right up to near-ties; merged tokens and sizes as PyTorch merges with the kernel's
    slots. Returns the number of tokens excused."""
    assert got.status == 0, f"{what}: the launch returned cudaError_t {got.status}"
    check_valid_layout(got, case)
    judged = judge(ek.decision(case), torch.from_numpy(got.slots), NEAR_TIE)
    assert judged.wrong == 0, (what, judged)
    check_same(got, ek.torch_merge(case, got.slots), case, what=what)
    return judged.excused


def random_case(rule: LayerRule, n: int, c: int, d: int, dtype, seed: int, batch: int = 3, protected: int = 1):
    rng = np.random.default_rng(seed)
    metric = rng.standard_normal((batch, n, d)).astype(dtype)
    x = rng.standard_normal((batch, n, c)).astype(dtype)
    r = max_removable(rule.name, n, protected) * 2 // 3
    return ek.make_case(rule, r, protected, metric, x=x, rng=rng)


RANDOM_SHAPES = [  # (N, C, D, dtype, batch): ViT-B/16 at 224 and 384, hidden-state metric, fp16
    (197, 64, 64, np.float32, 2),
    (577, 32, 64, np.float32, 1),
    (197, 1280, 1280, np.float32, 1),
    (197, 768, 64, np.float16, 2),
]
# PiToMe also on a 7 x 7 patch grid plus CLS with D = 16 (many near-ties among energies).
PITOME_RANDOM_SHAPES = [(197, 64, 64, np.float32, 2), (49, 1280, 16, np.float32, 2), (49, 768, 16, np.float16, 6)]


@pytest.mark.parametrize("name", list(RANDOM_RULES))
def test_random_inputs_match_pytorch_up_to_near_ties(cpu_kernels, name):
    rule, excused, tokens = RANDOM_RULES[name], 0, 0
    shapes = PITOME_RANDOM_SHAPES if rule.name == "pitome" else RANDOM_SHAPES
    for seed, (n, c, d, dtype, batch) in enumerate(shapes):
        case = random_case(rule, n, c, d, dtype, seed, batch=batch)
        excused += check_up_to_near_ties(ek.run_library(cpu_kernels, case), case, what=f"{name} N={n} C={c} D={d} {np.dtype(dtype).name}")
        tokens += batch * n
    print(f"\n{name}: {excused} of {tokens} tokens in another slot than PyTorch's, excused as near-ties (keys within {NEAR_TIE:g})")


# (batch, N) that reach the four launch layouts on the emulated device (8 SMs, 99 KiB of shared
# memory): one block per image or several, the N x N similarities in shared memory or the workspace.
LAYOUTS = {(1, False): (8, 197), (1, True): (8, 60), ("several", False): (2, 197), ("several", True): (2, 60)}


def test_every_launch_layout_matches_pytorch(cpu_kernels):
    """The fused kernel's four layouts, each for every method on random inputs, fp32 and fp16."""
    for (blocks, in_shared), (batch, n) in LAYOUTS.items():
        plan = launch_plan(cpu_kernels, batch, n)
        assert (plan["blocks_per_image"] == 1 if blocks == 1 else plan["blocks_per_image"] > 1), (batch, n, plan)
        assert plan["scores_in_shared"] == in_shared, (batch, n, plan)
        for seed, (name, rule) in enumerate(RANDOM_RULES.items()):
            dtype = np.float16 if seed % 2 else np.float32
            case = random_case(rule, n, 40, 24, dtype, seed, batch=batch)
            check_up_to_near_ties(ek.run_library(cpu_kernels, case), case, what=f"{name} B={batch} N={n} {plan}")


def test_a_shared_gpu_refusing_the_cooperative_launch_gets_one_block_per_image(cpu_kernels):
    """Several blocks per image wait for one another, so they launch cooperatively; a device that
    cannot keep them all resident (here the emulation keeps 2 blocks, where the plan wants 8 per
    image) refuses, and the launch runs one block per image instead, with the same slots."""
    rule = RANDOM_RULES["tome"]
    case = random_case(rule, 197, 40, 24, np.float32, 3, batch=1)
    assert launch_plan(cpu_kernels, 1, 197)["blocks_per_image"] == 8
    want = ek.run_library(cpu_kernels, case)
    cpu_kernels.tfemuSetResident(2)
    try:
        got = ek.run_library(cpu_kernels, case)
    finally:
        cpu_kernels.tfemuSetResident(8)
    check_up_to_near_ties(got, case, what="two blocks resident")
    np.testing.assert_array_equal(got.slots, want.slots)


def _roofline_script():
    spec = importlib.util.spec_from_file_location("roofline", ek.ROOT / "scripts" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_roofline_estimate_plans_as_the_kernel_and_the_readme_shows_it(cpu_kernels):
    """scripts/roofline.py models the kernel's own launch plan (checked against
    tokenfuseMergeLaunchPlan on the emulated device), and the plugin README's table is its output
    (rerun `python scripts/roofline.py --write` after changing the kernel)."""
    roofline = _roofline_script()
    emulated = roofline.Device("emulated", 8, 1.0, 1.0, 99 * 1024, "tests/cuda_emulation")
    for batch, n in [(1, 5), (1, 40), (2, 60), (3, 197), (8, 197), (1, 577), (16, 1024)]:
        model, kernel = roofline.launch_plan(batch, n, emulated), launch_plan(cpu_kernels, batch, n)
        assert {key: model[key] for key in kernel} == kernel, (batch, n)
    assert roofline.table(roofline.estimates()) in roofline.README.read_text()


def non_finite_case(rule: LayerRule, dtype, seed: int) -> ek.MergeCase:
    rng = np.random.default_rng(seed)
    n = 64
    metric = rng.standard_normal((2, n, 16)).astype(dtype)
    metric[0, 5, 3] = np.nan
    metric[0, 9, 0] = np.inf
    metric[1, 2, :] = -np.inf
    metric[1, 40, 7] = np.nan
    metric[1, 41, 1] = np.inf
    return ek.make_case(rule, max_removable(rule.name, n, 1), 1, metric, rng=rng)


def test_pytorch_gives_non_finite_metric_rows_the_lowest_similarity():
    metric = torch.randn(1, 6, 8)
    metric[0, 2, 1] = float("nan")
    metric[0, 4, 0] = float("inf")
    sim = cosine_similarity(metric)
    bad = [2, 4]
    assert (sim[0, bad] == NON_FINITE_SIMILARITY).all() and (sim[0, :, bad] == NON_FINITE_SIMILARITY).all()
    assert torch.isfinite(sim).all() and sim[0, [0, 1, 3, 5]][:, [0, 1, 3, 5]].min() >= -1.0001
    for name, rule in RULES.items():
        case = non_finite_case(rule, np.float32, 0)
        check_valid_layout(ek.torch_merge(case), case)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_non_finite_metric_stays_in_bounds_and_matches_pytorch(plain_driver, build_dir, dtype):
    """A NaN or Inf in the metric: the lowest similarity on both sides (once rowArgMax returned
    INT_MAX and the kernel read slot[INT_MAX]); run in a child process, which a wild read kills."""
    names = list(RANDOM_RULES)
    cases = [non_finite_case(RANDOM_RULES[name], dtype, seed) for seed, name in enumerate(names)]
    done, results = ek.run_driver(plain_driver, cases, build_dir / f"non_finite_{np.dtype(dtype).name}", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, case, got in zip(names, cases, results):
        check_up_to_near_ties(got, case, what=name)


def test_batch_beyond_grid_y_limit(cpu_kernels):
    """B = 65536 launches (the batch once sat on grid.y, which stops at 65535). The emulation
    checks each launch's configuration as a GPU does, without running the 65536 blocks."""
    rng = np.random.default_rng(0)
    case = ek.make_case(RULES["tome"], 1, 1, rng.standard_normal((65536, 4, 4)).astype(np.float32), rng=rng)
    cpu_kernels.tfemuSetExecute(0)
    try:
        assert ek.run_library(cpu_kernels, case).status == 0
    finally:
        cpu_kernels.tfemuSetExecute(1)


def sanitizer_cases() -> list[ek.MergeCase]:
    """Every method at N <= 197, fp32 and fp16, with the largest r (most code runs)."""
    rng = np.random.default_rng(5)
    cases = []
    for index, rule in enumerate(RANDOM_RULES.values()):
        n = 197 if index == 0 else 33 + 16 * index
        dtype = np.float16 if index % 2 else np.float32
        metric = rng.standard_normal((1, n, 24)).astype(dtype)
        cases.append(ek.make_case(rule, max_removable(rule.name, n, 1), 1, metric,
                                  x=rng.standard_normal((1, n, 40)).astype(dtype), rng=rng))
    return cases


SANITIZER_ENV = {"address": {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=66",
                             "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=66"},
                 "thread": {"TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0"}}


def run_sanitized(driver: Path, cases, work_dir: Path, sanitizer: str, env: dict | None = None):
    return ek.run_driver(driver, cases, work_dir, env=SANITIZER_ENV[sanitizer] | (env or {}), timeout=600)


def check_sanitized(driver, cases, work_dir, sanitizer):
    done, results = run_sanitized(driver, cases, work_dir, sanitizer)
    assert done.returncode == 0 and "Sanitizer" not in done.stderr, done.stderr[-3000:]
    for case, got in zip(cases, results):
        check_up_to_near_ties(got, case, what=case.rule.name)


def test_address_and_undefined_behaviour_sanitizers_are_clean(asan_driver, build_dir):
    cases = sanitizer_cases() + [non_finite_case(RULES["crossget"], np.float16, 1)]
    check_sanitized(asan_driver, cases, build_dir / "asan", "address")


def test_thread_sanitizer_is_clean(tsan_driver, build_dir):
    check_sanitized(tsan_driver, sanitizer_cases(), build_dir / "tsan", "thread")


SYNC = re.compile(r"__syncthreads\(\)\s*;")


def race_cases() -> list[ek.MergeCase]:
    """Small inputs on which every method's code path runs (every __syncthreads is reached): one
    block per image (N = 28, one tile pair), metric rows of three chunks (D = 40), and once an
    image spread over three blocks (N = 40 at batch 1: three tile pairs on the emulated 8 SMs)."""
    rng = np.random.default_rng(7)
    cases = [ek.make_case(rule, max_removable(rule.name, 28, 1) - 1, 1, rng.standard_normal((1, 28, 40)).astype(np.float32), rng=rng)
             for rule in RANDOM_RULES.values()]
    return cases + [ek.make_case(RULES["tome"], 12, 1, rng.standard_normal((1, 40, 16)).astype(np.float32), rng=rng)]


DELETED_SYNC = "TOKENFUSE_DELETED_SYNC"


def deletable_syncs(source: str) -> str:
    """`source` with its k-th __syncthreads skipped when $TOKENFUSE_DELETED_SYNC is k: one
    ThreadSanitizer build stands for every single deletion."""
    site = itertools.count()
    body = SYNC.sub(lambda _: f"(tfemuDeletedSync() == {next(site)} ? void() : __syncthreads());", source)
    selector = (f"#include <cstdlib>\nstatic int tfemuDeletedSync() {{ static const int site = std::getenv(\"{DELETED_SYNC}\") ? "
                f"std::atoi(std::getenv(\"{DELETED_SYNC}\")) : -1; return site; }}\n")
    return selector + body


@pytest.mark.slow  # 26 ThreadSanitizer runs: a test of the race test, not of the kernels
def test_deleting_any_syncthreads_makes_the_race_test_fail(build_dir):
    """Each __syncthreads of the .cu in turn deleted: the ThreadSanitizer run of every method must
    then fail (a reported race, a wrong result or a crash)."""
    problem = ek.sanitizer_problem("thread")
    if problem:
        skip_or_fail(problem)
    source = ek.KERNEL_SOURCE.read_text()
    lines = [source.count("\n", 0, m.start()) + 1 for m in SYNC.finditer(source)]
    assert lines, "no __syncthreads in the kernels"
    work = build_dir / "nosync"
    work.mkdir(exist_ok=True)
    copy = work / ek.KERNEL_SOURCE.name
    copy.write_text(deletable_syncs(source))
    driver = ek.build_driver(work, "thread", source=copy)
    cases = race_cases()
    wants = [ek.torch_merge(case) for case in cases]

    def run(index: int) -> tuple[bool, str]:
        """With the index-th __syncthreads deleted (-1: none): whether the race test failed (a
        reported race, a crash or a wrong result), and the run's stderr."""
        done, results = run_sanitized(driver, cases, work / f"cases{index}", "thread", env={DELETED_SYNC: str(index)})
        wrong = any(got is None or not np.array_equal(got.slots, want.slots) for got, want in zip(results, wants))
        return done.returncode != 0 or "ThreadSanitizer" in done.stderr or wrong, done.stderr

    failed, stderr = run(-1)
    assert not failed, "the build that deletes nothing must pass the race test: " + stderr[-2000:]
    with ThreadPoolExecutor(max_workers=2) as pool:
        unnoticed = [f"line {line}" for line, (failed, _) in zip(lines, pool.map(run, range(len(lines)))) if not failed]
    print(f"\n{len(lines)} __syncthreads deleted one at a time; unnoticed: {unnoticed or 'none'}")
    assert not unnoticed, f"deleting the __syncthreads at {unnoticed} went unnoticed by the race test"


def test_text_inputs_match_pytorch(cpu_kernels):
    """Text encoders through the trailing arguments: the padding mask (BERT), plus CLIP text's
    frozen EOS token and causal positions. Exact-tie metrics (and dyadic shifts for padding), so the
    slots must be identical; merged x, sizes, mask and positions as TokenMerge.merge_padded and
    merge_positions."""
    rng = np.random.default_rng(21)
    n, batch = 40, 3
    lengths = np.array([[n], [n // 2], [7]])
    pos = np.arange(n)
    valid = (pos < lengths).astype(np.float32)
    for name, rule in RULES.items():
        for causal in (False, True):
            frozen = (pos == lengths - 1).astype(np.float32) if causal else None
            positions = np.ascontiguousarray(np.broadcast_to(pos.astype(np.float32), (batch, n))) if causal else None
            # half way, and the limit (with CLIP's frozen EOS on an even position in the third text: 6)
            for r in (max_removable(rule.name, n, 1 + causal) // 2 + 1, max_removable(rule.name, n, 1 + causal, frozen=causal)):
                case = tie_case(rule, n, r, 1, rng, batch=batch)
                slots, out_x, out_size = ek._outputs(case)
                out_valid = np.full((batch, n - r), np.nan, dtype=np.float32)
                out_positions = np.full((batch, n - r), np.nan, dtype=np.float32)
                workspace = np.zeros(int(cpu_kernels.tokenfuseMergeWorkspaceSize(batch, n, case.metric.shape[2])), dtype=np.uint8)
                pointer = lambda a: None if a is None else ek._pointer(a)  # noqa: E731
                status = cpu_kernels.tokenfuseMergeFloat(
                    pointer(case.params()), pointer(case.x), pointer(case.metric), pointer(case.size), pointer(case.cls_attn),
                    pointer(out_x), pointer(out_size), pointer(slots), pointer(workspace), None,
                    pointer(valid), pointer(frozen), pointer(positions), pointer(out_valid), pointer(out_positions) if causal else None,
                    None)
                what = f"{name} {'causal' if causal else 'padded'} r={r}"
                assert status == 0, what
                real = torch.from_numpy(valid) > 0.5
                plan = match_step(rule, torch.from_numpy(case.metric), r, protected=1,
                                  cls_attn=torch.from_numpy(case.cls_attn) if rule.name == "turbo" else None, valid=real,
                                  frozen=torch.from_numpy(frozen) > 0.5 if causal else None)
                want_x, want_size, want_valid = plan.merge_padded(torch.from_numpy(case.x), torch.from_numpy(case.size)[..., None], real)
                np.testing.assert_array_equal(slots, plan.dst_slot.numpy(), err_msg=what)
                np.testing.assert_allclose(out_x, want_x.numpy(), rtol=1e-5, atol=1e-6, err_msg=what)
                np.testing.assert_allclose(out_size, want_size[..., 0].numpy(), rtol=1e-6, err_msg=what)
                np.testing.assert_array_equal(out_valid, want_valid.float().numpy(), err_msg=what)
                if causal:
                    np.testing.assert_array_equal(out_positions, plan.merge_positions(torch.from_numpy(positions)).numpy(), err_msg=what)


@pytest.mark.parametrize("sanitizer", ["none", "thread"])
def test_emulation_builtins_behave_as_cuda(build_dir, sanitizer):
    """tests/cuda_emulation/emulationSelfTest.cpp: shuffles, votes, atomics, shared memory, early
    exit, launch limits, half conversions, vector types and math, each against CUDA's definition;
    under ThreadSanitizer the emulation itself must be race-free."""
    problem = ek.sanitizer_problem(sanitizer) if sanitizer != "none" else None
    if ek.compiler() is None or problem:
        skip_or_fail(problem or "no C++ compiler (set CXX, or install g++)")
    program = ek._compile(build_dir / f"emulation_self_test_{sanitizer}", [ek.EMULATION_DIR / "emulationSelfTest.cpp"],
                          ek.SANITIZERS[sanitizer] + ["-Wno-tsan"] * (sanitizer == "thread"))
    done = subprocess.run([str(program)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1:exitcode=66"})
    assert done.returncode == 0 and done.stdout.strip().endswith("0 failed"), done.stdout + done.stderr
