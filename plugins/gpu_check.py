"""`tokenfuse plugin check`: the SimilarityEnergyMerge CUDA kernels on a GPU, without TensorRT.

    tokenfuse plugin check                 # build for this GPU, check, time (--report FILE: the figures as Markdown)
    tokenfuse plugin check --sanitize      # also every compute-sanitizer tool (quick inputs)
    tokenfuse plugin check --quick         # correctness only, few inputs

Needs torch with CUDA and nvcc; no TensorRT. The kernels are compiled for this GPU into the build
folder, unless --library names a library with the kernels' C entry points (the plugin library).

Correctness, per method and PiToMe variant, fp32 and fp16, N 197/577/1024, D 64/768, C up to 1280:
* exact ties (metric rows of four ones among sixteen zeros; cosines are multiples of 1/4): the
  kernel's slots must equal the exporter's PyTorch merge everywhere;
* random inputs: every slot must be right up to near-ties (tokenfuse.exporter.agreement, the
  export validation's rule): the kernel may order two tokens against PyTorch, or pick another
  partner, only where PyTorch's own keys differ by at most NEAR_TIE; such tokens are counted;
* non-finite metrics (NaN, Inf): the same rule (both give such rows the lowest similarity);
* merged tokens: PyTorch's merge applied with the kernel's own slots, within 1e-4 (fp32) or 2e-2
  (fp16) relative everywhere, sizes equal; outputs are poisoned first, so an unwritten element fails.
Timing: each method at B 1/8/32/64, N 197, D 64 (C = 768, fp16): the kernel and the same merge in
PyTorch's standard ops, against ViT-B/16's own fp16 block, GPU time from CUDA graph replays with the
inputs rotated past L2 (graph_ms). scripts/gpu_check.sh runs all of this in one bounded call.
"""

from __future__ import annotations

import ctypes
import json
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..exporter import agreement, methods, plugin_lowering
from ..exporter.errors import UsageError
from . import SOURCE_DIR, nvcc_path, default_build_dir

KERNELS = SOURCE_DIR / "similarityEnergyMergePlugin" / "similarityEnergyMergeKernels.cu"
CASES = [("tome", "plain"), ("crossget", "plain"), ("turbo", "plain"), ("pitome", "plain"), ("pitome", "bsm"), ("pitome", "text")]
NEAR_TIE = 1e-4  # keys closer than this may order either way (the fp32 export validation's tolerance)
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
TRAILING_ZEROS = 6  # entry points may gain trailing arguments (text encoders); zeros there mean "none"


# ---- the slot gate (pure; unit-tested on the CPU) -------------------------------------------------

def slot_gate(decision, got: torch.Tensor, exact: bool, near_tie: float = NEAR_TIE) -> dict:
    """The kernel's slots [B, N] against PyTorch's `decision`: identical where `exact` (exact-tie
    inputs test the tie-breaking itself), otherwise right up to near-ties."""
    judged = agreement.judge(decision, got, near_tie)
    wrong = judged.tokens - judged.equal if exact else judged.wrong
    return {"tokens": judged.tokens, "identical": judged.equal, "excused": 0 if exact else judged.excused,
            "wrong": wrong, "passed": wrong == 0}


# ---- the report (pure; unit-tested on the CPU) ----------------------------------------------------

def markdown_report(environment: dict, correctness: list[dict], timings: list[dict], sanitizers: dict, command: str) -> str:
    """docs/plugin-gpu.md: what ran, where, and every figure."""
    lines = ["# SimilarityEnergyMerge kernels on a GPU", "",
             f"Written by `{command}`; every figure below comes from that run.", "",
             "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in environment.items()]
    lines += ["", "## Correctness against the exporter's PyTorch merge", "",
              f"Slots: a token in another slot than PyTorch's is excused only where PyTorch's own keys put the two "
              f"choices within {NEAR_TIE:g} of each other (exact-tie inputs excuse nothing); merged tokens: PyTorch's "
              "merge with the kernel's slots.", "",
              "| inputs | method | variant | dtype | N | D | tokens | identical | near-ties excused | wrong | max rel. error | passed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in correctness:
        lines.append(f"| {row['inputs']} | {row['method']} | {row['variant']} | {row['dtype']} | {row['n']} | {row['d']} | "
                     f"{row['tokens']} | {row['identical']} | {row['excused']} | {row['wrong']} | "
                     f"{row['max_rel_error']:.2e} | {'yes' if row['passed'] else 'NO'} |")
    if sanitizers:
        lines += ["", "## compute-sanitizer (quick inputs)", "", "| tool | exit status | errors reported |", "|---|---|---|"]
        lines += [f"| {tool} | {r['returncode']} | {r['summary']} |" for tool, r in sanitizers.items()]
    if timings:
        lines += ["", "## Time per merging layer (fp16, C = 768)", "",
                  "GPU time per call from CUDA graph replays (inputs rotated past L2, no host work timed); medians. "
                  "PyTorch merge: the same decision and merge in standard ops (what the ONNX lowering exports).", "",
                  "| method | variant | B | N | D | r | blocks per image | kernel (ms) | PyTorch merge (ms) | ViT-B block (ms) | kernel / block | PyTorch merge / block |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in timings:
            cells = [f"{row[k]:.4f}" if k in row else row.get(k.replace("_ms", "_error"), "n/a") for k in ("kernel_ms", "pytorch_ms")]
            shares = [f"{row[k] / row['block_ms']:.1%}" if k in row else "n/a" for k in ("kernel_ms", "pytorch_ms")]
            blocks = row.get("launch", {}).get("blocks_per_image", "n/a")
            lines.append(f"| {row['method']} | {row['variant']} | {row['batch']} | {row['n']} | {row['d']} | {row['r']} | {blocks} | "
                         f"{cells[0]} | {cells[1]} | {row['block_ms']:.4f} | {shares[0]} | {shares[1]} |")
    return "\n".join(lines) + "\n"


# ---- the GPU side ---------------------------------------------------------------------------------

def build_kernels(build_dir: Path | None = None) -> Path:
    """The kernels alone as a shared library for this machine's GPU, in `build_dir` (default: the
    plugin's build folder, created)."""
    build_dir = Path(build_dir or default_build_dir())
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / "libtokenfuse_kernels.so"
    major, minor = torch.cuda.get_device_capability()
    command = [str(nvcc_path()), "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo",
               f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}", "-I", str(KERNELS.parent),
               str(KERNELS), "-o", str(library)]
    print(" ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[-300:])
        raise UsageError(f"nvcc could not compile the kernels for sm_{major}{minor}: {first}")
    return library


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with the argument and result types of the kernels' C entry points
    (similarityEnergyMergeKernels.h), whether built for a GPU or for the CPU emulation."""
    lib.tokenfuseMergeWorkspaceSize.restype = ctypes.c_size_t
    lib.tokenfuseMergeWorkspaceSize.argtypes = [ctypes.c_int32] * 3
    for name in ("tokenfuseMergeFloat", "tokenfuseMergeHalf"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p] * (10 + TRAILING_ZEROS)
    lib.tokenfuseMergeLaunchPlan.restype = ctypes.c_int
    lib.tokenfuseMergeLaunchPlan.argtypes = [ctypes.c_int32] * 2 + [ctypes.c_void_p] * 4
    return lib


def launch_plan(lib: ctypes.CDLL, batch: int, n: int) -> dict:
    """How the fused kernel launches on the current device for this batch and token count: blocks
    per image, threads, dynamic shared bytes, whether the N x N similarities are in shared memory."""
    split, threads, in_shared, shared = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32(), ctypes.c_size_t()
    status = lib.tokenfuseMergeLaunchPlan(batch, n, ctypes.byref(split), ctypes.byref(threads), ctypes.byref(shared),
                                          ctypes.byref(in_shared))
    if status != 0:
        raise RuntimeError(f"tokenfuseMergeLaunchPlan({batch}, {n}) returned cudaError {status}")
    return {"blocks_per_image": split.value, "threads": threads.value, "shared_bytes": shared.value,
            "scores_in_shared": bool(in_shared.value)}


class Kernels:
    def __init__(self, path: Path):
        self.lib = bind(ctypes.CDLL(str(path)))
        self._reused = {}

    def plan(self, batch: int, n: int) -> dict:
        return launch_plan(self.lib, batch, n)

    def _buffers(self, batch, n, out_tokens, channels, dim, dtype, device):
        # poisoned: an element the kernel leaves unwritten shows (NaN, slot -7)
        out_x = torch.full((batch, out_tokens, channels), float("nan"), dtype=dtype, device=device)
        out_size = torch.full((batch, out_tokens), float("nan"), device=device)
        slots = torch.full((batch, n), -7, dtype=torch.int32, device=device)
        workspace = torch.empty(max(self.lib.tokenfuseMergeWorkspaceSize(batch, n, dim), 1), dtype=torch.uint8, device=device)
        return out_x, out_size, slots, workspace

    def merge(self, rule, out_tokens, protected, x, metric, size, cls_attn, fresh: bool = True):
        """x [B, N, C], metric [B, N, D] (CUDA, fp32 or fp16), size [B, N] fp32, cls_attn [B, N] or None.
        fresh=False (timing) reuses one set of outputs and workspace per shape, so only the launch runs."""
        batch, n, channels = x.shape
        words = torch.zeros(11 + 16, dtype=torch.int32)  # MergeParams, then zeros for fields added later
        words[:11] = torch.from_numpy(plugin_lowering.kernel_params(rule, batch, n, out_tokens, channels, metric.shape[-1], protected))
        shape = (batch, n, out_tokens, channels, metric.shape[-1], x.dtype, x.device)
        if fresh or shape not in self._reused:
            self._reused[shape] = self._buffers(*shape)
        out_x, out_size, slots, workspace = self._reused[shape]
        entry = self.lib.tokenfuseMergeHalf if x.dtype == torch.float16 else self.lib.tokenfuseMergeFloat
        status = entry(words.data_ptr(), x.data_ptr(), metric.data_ptr(), size.data_ptr(),
                       cls_attn.data_ptr() if cls_attn is not None else None, out_x.data_ptr(), out_size.data_ptr(),
                       slots.data_ptr(), workspace.data_ptr(), torch.cuda.current_stream().cuda_stream, *([None] * TRAILING_ZEROS))
        if status != 0:
            raise RuntimeError(f"kernel launch returned cudaError {status}")
        return out_x, out_size, slots


@dataclass
class Inputs:
    x: torch.Tensor
    metric: torch.Tensor
    size: torch.Tensor
    cls_attn: torch.Tensor

    def to(self, device) -> "Inputs":
        return Inputs(self.x.to(device), self.metric.to(device), self.size.to(device), self.cls_attn.to(device))


def draw(kind: str, batch: int, n: int, channels: int, dim: int, dtype, seed: int) -> Inputs:
    rng = np.random.default_rng(seed)
    if kind == "ties":
        patterns = np.zeros((5, 16), dtype=np.float32)
        for row in patterns:
            row[rng.choice(16, 4, replace=False)] = 1.0
        metric = patterns[rng.integers(0, 5, (batch, n))]
        cls_attn = (rng.integers(0, 4, (batch, n)) / 8).astype(np.float32)
    else:
        metric = rng.standard_normal((batch, n, dim)).astype(np.float32)
        if kind == "non-finite":
            metric[0, 3, 1], metric[-1, 7, :], metric[-1, 9, 0] = np.nan, np.inf, -np.inf
        logits = rng.standard_normal((batch, n))
        cls_attn = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    x = rng.standard_normal((batch, n, channels)).astype(np.float32)
    size = rng.integers(1, 4, (batch, n)).astype(np.float32)
    return Inputs(torch.from_numpy(x).to(dtype), torch.from_numpy(metric).to(dtype), torch.from_numpy(size), torch.from_numpy(cls_attn))


def rule_for(name: str, variant: str, ties: bool):
    # On ties the energies must be exact sums: ELU at margin 0 (cosines >= 0), Gaussian at 0.99 (0 or 1)
    margin = {"plain": 0.0, "bsm": 0.0, "text": 0.99}[variant] if ties else {"plain": 0.675, "bsm": 0.45, "text": 0.6}[variant]
    if name == "pitome":
        return methods.LayerRule(name, margin=margin, variant=variant)
    return methods.LayerRule(name, turbo_weight=2.0 if ties else 12.5) if name == "turbo" else methods.LayerRule(name)


def check_one(kernels, kind, name, variant, dtype, n, d, channels, seed, batch) -> dict:
    rule = rule_for(name, variant, kind == "ties")
    protected = 1 + seed % 2
    r = methods.max_removable(name, n, protected) * 2 // 3
    inputs = draw(kind, batch, n, channels, d, dtype, seed)
    cls_attn = inputs.cls_attn if name == "turbo" else None
    plan = methods.match_step(rule, inputs.metric.float(), r, protected=protected, cls_attn=cls_attn)
    decision = agreement.Decision(rule, inputs.metric.float(), r, protected, cls_attn, None, None, plan.dst_slot)
    got_x, got_size, got_slots = kernels.merge(rule, n - r, protected, inputs.x.cuda(), inputs.metric.cuda(), inputs.size.cuda(),
                                               inputs.cls_attn.cuda() if name == "turbo" else None)
    got_slots = got_slots.cpu().to(torch.int64)
    row = {"inputs": kind, "method": name, "variant": variant, "dtype": str(dtype).split(".")[-1], "n": n, "d": d,
           **slot_gate(decision, got_slots, exact=kind == "ties")}
    in_range = bool(((got_slots >= 0) & (got_slots < n - r)).all())
    error = float("inf")
    if in_range:  # the merge itself, with the kernel's own decisions
        want_x, want_size = methods.TokenMerge(got_slots, n - r).merge(inputs.x, inputs.size.unsqueeze(-1))
        error = float((got_x.cpu().float() - want_x.float()).abs().max() / want_x.float().abs().max().clamp_min(1e-6))
        row["passed"] &= bool(torch.allclose(got_size.cpu(), want_size[..., 0]))
    row["max_rel_error"] = error
    row["passed"] &= error <= (1e-4 if dtype == torch.float32 else 2e-2)  # NaN (an unwritten element) fails too
    return row


def correctness(kernels, quick: bool, stop=None) -> list[dict]:
    """Every method, variant, dtype and input kind at each shape in turn, smallest shape first (so a
    `stop` that cuts the run short leaves every method checked at N = 197)."""
    rows = []
    shapes = [(197, 64, 768), (577, 64, 256), (1024, 768, 64), (197, 1280, 1280)]
    for k, (n, d, channels) in enumerate(shapes[:1] if quick else shapes):
        for index, (name, variant) in enumerate(CASES):
            for dtype in (torch.float32, torch.float16):
                seed = 100 * index + 10 * k + (dtype == torch.float16)
                for kind in ("ties", "random", "non-finite"):
                    if stop is not None and stop():
                        return rows
                    rows.append(check_one(kernels, kind, name, variant, dtype, n, d, channels, seed,
                                          batch=2 if quick else 8))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def feeds_past_l2(make, bytes_each: int, most: int = 64) -> list:
    """Enough input sets that one pass over them reads twice the L2 cache (at most `most`)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20) if torch.cuda.is_available() else 64 << 20
    return [make(i) for i in range(max(2, min(most, -(-2 * l2 // max(bytes_each, 1)))))]


def graph_ms(fn, feeds: list, repeats: int = 7, target_ms: float = 20.0) -> dict:
    """GPU milliseconds per call of fn(feed): one CUDA graph holds a call on every feed (inputs
    rotated past L2), replayed enough times per CUDA-event pair to last about `target_ms`, so no
    host work is timed; median and minimum over `repeats` pairs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (allocations, lazy init)
        for feed in feeds[:2]:
            fn(feed)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for feed in feeds:
            fn(feed)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    replays = max(1, int(target_ms / max(start.elapsed_time(end), 1e-3)))
    per_call = []
    for _ in range(repeats):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / (replays * len(feeds)))
    return {"median_ms": statistics.median(per_call), "min_ms": min(per_call), "feeds": len(feeds), "replays": replays}


def model_block():
    """ViT-B/16's own block (timm, pre-norm attention + MLP, fused attention), fp16, for the scale of a layer."""
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False).blocks[0].half().eval()


def timings(kernels, shapes=((197, 1), (197, 8), (197, 32), (197, 64)), deadline=None, on_row=None, device="cuda") -> list[dict]:
    """Per (N, B): the model's block, and for each method the fused kernel (one launch, plus a
    memset when an image spreads over several blocks; its launch plan recorded) and the PyTorch
    merge (the pure-op formulation the ONNX lowering exports), fp16, C = 768, D = 64 (keys
    averaged over heads), each alone in a CUDA graph."""
    rows, block, channels, d = [], model_block().to(device), 768, 64
    for n, batch in shapes:
        if deadline is not None and deadline():
            break
        with torch.no_grad():
            block_ms = graph_ms(block, feeds_past_l2(lambda i: torch.randn(batch, n, channels, dtype=torch.float16, device=device),
                                                     batch * n * channels * 2))
        inputs = feeds_past_l2(lambda i: draw("random", batch, n, channels, d, torch.float16, seed=i).to(device), batch * n * (channels + d) * 2)
        for name, variant in CASES:
            rule = rule_for(name, variant, ties=False)
            r = methods.max_removable(name, n, 1) // 4
            turbo = name == "turbo"

            def kernel(feed):
                return kernels.merge(rule, n - r, 1, feed.x, feed.metric, feed.size, feed.cls_attn if turbo else None, fresh=False)

            def pytorch(feed):
                plan = methods.match_step(rule, feed.metric, r, protected=1, cls_attn=feed.cls_attn if turbo else None)
                return methods.TokenMerge(plan.dst_slot, n - r).merge(feed.x, feed.size.unsqueeze(-1))

            row = {"method": name, "variant": variant, "batch": batch, "n": n, "d": d, "r": r, "block_ms": block_ms["median_ms"],
                   "launch": kernels.plan(batch, n)}
            for label, fn in (("kernel", kernel), ("pytorch", pytorch)):
                try:
                    with torch.no_grad():
                        row[f"{label}_ms"] = graph_ms(fn, inputs)["median_ms"]
                except Exception as error:  # recorded, and the next one runs
                    row[f"{label}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            rows.append(row)
            if on_row:
                on_row(rows)
            print(json.dumps(row), flush=True)
    return rows


def driver_version() -> str:
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"CUDA driver API {version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return "unknown"


def environment() -> dict:
    smi = shutil.which("nvidia-smi")
    driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip() if smi else ""
    return {"device": torch.cuda.get_device_name(), "compute capability": "sm_%d%d" % torch.cuda.get_device_capability(),
            "driver": f"{driver or 'unknown'} ({driver_version()})", "CUDA (torch)": torch.version.cuda,
            "nvcc": subprocess.run([str(nvcc_path()), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1],
            "torch": torch.__version__, "host": platform.node()}


def run_sanitizers(library: Path, tools=SANITIZER_TOOLS, timeout: float = 600.0) -> dict:
    """`tokenfuse plugin check --quick` under each compute-sanitizer tool, each bounded by `timeout` seconds."""
    tool = shutil.which("compute-sanitizer") or str(nvcc_path().parent / "compute-sanitizer")
    results = {}
    for name in tools:
        command = [tool, "--tool", name, "--error-exitcode", "3", sys.executable, "-m", "tokenfuse.cli", "plugin", "check", "--quick",
                   "--library", str(library)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            summary = next((line.strip() for line in reversed(done.stdout.splitlines()) if "ERROR SUMMARY" in line), "no summary")
            results[name] = {"returncode": done.returncode, "summary": summary}
        except subprocess.TimeoutExpired:
            results[name] = {"returncode": None, "summary": f"stopped after {timeout:.0f} s"}
        print(name, results[name], flush=True)
    return results


def check(library: Path | None = None, *, build_dir: Path | None = None, quick: bool = False, sanitize: bool = False,
          report: Path | None = None, log=print) -> list:
    """Build into `build_dir` (unless `library`), check, time (unless `quick`), optionally sanitize; write `report`
    (Markdown) when given. Returns what failed: correctness rows and sanitizer tools."""
    if not torch.cuda.is_available():
        raise UsageError("no CUDA device: tokenfuse plugin check runs the kernels on a GPU (the CPU emulation is in the test suite)")
    library = library or build_kernels(build_dir)
    kernels = Kernels(library)
    with torch.no_grad():
        rows = correctness(kernels, quick)
        times = [] if quick else timings(kernels)
    sanitizers = run_sanitizers(library) if sanitize else {}
    failed = [row for row in rows if not row["passed"]] + [t for t, r in sanitizers.items() if r["returncode"] != 0]
    if report:
        command = "tokenfuse plugin check" + (" --sanitize" if sanitize else "") + (" --quick" if quick else "")
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(markdown_report(environment(), rows, times, sanitizers, command))
        log(f"wrote {report}")
    log(f"{len(failed)} failed of {len(rows)} correctness rows and {len(sanitizers)} sanitizer runs")
    return failed
