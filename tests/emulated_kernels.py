"""The plugin's CUDA kernels compiled for the CPU (tests/cuda_emulation/) and run from Python.

Two ways in, both through the C entry points of similarityEnergyMergeKernels.h only:
* `build_library` + `run_library`: a shared library called with ctypes (fast, in process);
* `build_driver` + `run_driver`: a small executable (tests/cuda_emulation/mergeDriver.cpp) that
  reads cases from files, for the AddressSanitizer/UBSan and ThreadSanitizer builds.

`torch_merge` is the exporter's PyTorch merge of the same case (`match_step` + the shared merge),
the semantics the kernels must reproduce.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenfuse.exporter.agreement import Decision
from tokenfuse.exporter.methods import LayerRule, TokenMerge, match_step
from tokenfuse.exporter.plugin_lowering import kernel_params
from tokenfuse.plugins import gpu_check

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "plugins" / "similarityEnergyMergePlugin"
# The kernels under test: the plugin's, or a candidate copy (which includes the plugin's headers).
KERNEL_SOURCE = Path(os.environ.get("TOKENFUSE_KERNEL_SOURCE") or PLUGIN_DIR / "similarityEnergyMergeKernels.cu")
EMULATION_DIR = Path(__file__).resolve().parent / "cuda_emulation"

# Entry points may gain trailing arguments (text encoders: padding mask, frozen EOS, positions);
# the harness passes this many zeros after today's arguments, which a callee that reads fewer ignores.
TRAILING_ZEROS = gpu_check.TRAILING_ZEROS
# MergeParams may gain fields at its end: the harness passes today's fields then this many zero words.
PARAM_PADDING_WORDS = 16

COMPILE_FLAGS = ["-std=c++20", "-ffp-contract=off", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
                 "-Wno-unused-parameter", "-DTOKENFUSE_CPU_EMULATION"]
SANITIZERS = {
    "none": ["-O2"],
    "address": ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "thread": ["-O1", "-fsanitize=thread"],
}


def compiler() -> str | None:
    """The C++ compiler: $CXX, else g++, else c++."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compile(output: Path, sources: list[Path], flags: list[str], include_dir: Path = PLUGIN_DIR) -> Path:
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (set CXX, or install g++)")
    command = [cxx, *COMPILE_FLAGS, *flags, f"-I{EMULATION_DIR}", f"-I{include_dir}", "-o", str(output)]
    for source in sources:  # the .cu is C++ for the CPU; .cpp and .o by their suffix
        command += ["-x", "c++", str(source), "-x", "none"] if source.suffix == ".cu" else [str(source)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compile failed: {' '.join(command)}\n{done.stderr[-4000:]}")
    return output


def build_library(out_dir: Path, source: Path = KERNEL_SOURCE) -> Path:
    """libmerge_cpu.so: the kernels on CPU threads, plus the emulation's switches."""
    return _compile(Path(out_dir) / "libmerge_cpu.so", [source, EMULATION_DIR / "emulationControl.cpp"],
                    ["-O2", "-fPIC", "-shared"])


def build_driver(out_dir: Path, sanitizer: str = "none", source: Path = KERNEL_SOURCE) -> Path:
    """merge_driver_<sanitizer>: the kernels and mergeDriver.cpp in one sanitized executable."""
    return _compile(Path(out_dir) / f"merge_driver_{sanitizer}", [source, EMULATION_DIR / "mergeDriver.cpp"], SANITIZERS[sanitizer])


@functools.cache
def sanitizer_problem(sanitizer: str) -> str | None:
    """None when `sanitizer` builds and runs a threaded program here, else why not."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (set CXX, or install g++)"
    program = "#include <thread>\nint main() { int v = 0; std::thread t([&] { v = 1; }); t.join(); return v - 1; }\n"
    with tempfile.TemporaryDirectory() as scratch:
        source, binary = Path(scratch, "probe.cpp"), Path(scratch, "probe")
        source.write_text(program)
        built = subprocess.run([cxx, "-std=c++20", "-pthread", *SANITIZERS[sanitizer], str(source), "-o", str(binary)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return f"{sanitizer} sanitizer runtime missing: {built.stderr.strip().splitlines()[-1:]}"
        ran = subprocess.run([str(binary)], capture_output=True, text=True)
        if ran.returncode != 0:
            return f"{sanitizer} sanitizer does not run here: {ran.stderr.strip()[-300:]}"
    return None


@dataclass
class MergeCase:
    """One merge step's inputs: x [B, N, C] and metric [B, N, D] in fp32 or fp16, size [B, N] and
    cls_attn [B, N] in fp32 (cls_attn read by turbo only)."""

    rule: LayerRule
    r: int
    protected: int
    x: np.ndarray
    metric: np.ndarray
    size: np.ndarray
    cls_attn: np.ndarray

    @property
    def shape(self):
        return self.x.shape[0], self.x.shape[1], self.x.shape[2], self.metric.shape[2]

    def params(self) -> np.ndarray:
        """MergeParams as int32 words (floats by their bits), zero-padded at the end."""
        batch, n, c, d = self.shape
        return np.concatenate([kernel_params(self.rule, batch, n, n - self.r, c, d, self.protected),
                               np.zeros(PARAM_PADDING_WORDS, dtype=np.int32)])


def make_case(rule: LayerRule, r: int, protected: int, metric: np.ndarray, x: np.ndarray | None = None,
              rng: np.random.Generator | None = None, cls_attn: np.ndarray | None = None) -> MergeCase:
    """A case from a metric; x, sizes and the CLS attention drawn from `rng` where not given."""
    rng = rng or np.random.default_rng(0)
    batch, n, _ = metric.shape
    if x is None:
        x = rng.standard_normal((batch, n, 8)).astype(metric.dtype)
    size = rng.integers(1, 4, (batch, n)).astype(np.float32)
    if cls_attn is None:
        logits = rng.standard_normal((batch, n))
        cls_attn = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    return MergeCase(rule, r, protected, np.ascontiguousarray(x), np.ascontiguousarray(metric), size, cls_attn)


@dataclass
class MergeResult:
    status: int  # cudaError_t
    slots: np.ndarray  # [B, N] int32
    x: np.ndarray  # [B, K, C]
    size: np.ndarray  # [B, K]


def _outputs(case: MergeCase):
    batch, n, c, _ = case.shape
    k = n - case.r
    return (np.full((batch, n), -7, dtype=np.int32), np.full((batch, k, c), np.nan, dtype=case.x.dtype),
            np.full((batch, k), np.nan, dtype=np.float32))


def load_library(path: Path) -> ctypes.CDLL:
    """The CPU build of the kernels, with the entry points typed as on a GPU, plus the emulation's switches."""
    lib = gpu_check.bind(ctypes.CDLL(str(path)))
    lib.tfemuSetExecute.argtypes = [ctypes.c_int]
    lib.tfemuSetResident.argtypes = [ctypes.c_int]
    return lib


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


def run_library(lib: ctypes.CDLL, case: MergeCase) -> MergeResult:
    """Call the kernels' C entry point on host memory (the emulation's device memory)."""
    batch, n, _, d = case.shape
    slots, out_x, out_size = _outputs(case)
    workspace = np.zeros(max(int(lib.tokenfuseMergeWorkspaceSize(batch, n, d)), 1), dtype=np.uint8)
    params = case.params()
    entry = lib.tokenfuseMergeHalf if case.x.dtype == np.float16 else lib.tokenfuseMergeFloat
    status = entry(_pointer(params), _pointer(case.x), _pointer(case.metric), _pointer(case.size), _pointer(case.cls_attn),
                   _pointer(out_x), _pointer(out_size), _pointer(slots), _pointer(workspace), None,
                   *([None] * TRAILING_ZEROS))
    return MergeResult(status, slots, out_x, out_size)


def write_case(path: Path, case: MergeCase) -> None:
    """The driver's input: int32 fp16 flag, the MergeParams words, x, metric, size, cls_attn."""
    with open(path, "wb") as f:
        np.array([case.x.dtype == np.float16, len(case.params())], dtype=np.int32).tofile(f)
        for array in (case.params(), case.x, case.metric, case.size, case.cls_attn):
            np.ascontiguousarray(array).tofile(f)


def read_result(path: Path, case: MergeCase) -> MergeResult:
    """The driver's output: int32 status, slots, merged x, merged sizes."""
    slots, out_x, out_size = _outputs(case)
    data = Path(path).read_bytes()
    status = int(np.frombuffer(data[:4], dtype=np.int32)[0])
    offset = 4
    for array in (slots, out_x, out_size):
        array[...] = np.frombuffer(data[offset:offset + array.nbytes], dtype=array.dtype).reshape(array.shape)
        offset += array.nbytes
    return MergeResult(status, slots, out_x, out_size)


def run_driver(driver: Path, cases: list[MergeCase], work_dir: Path, env: dict | None = None,
               timeout: float = 300) -> tuple[subprocess.CompletedProcess, list[MergeResult | None]]:
    """Run every case in one process; a case whose output is missing (the run died) gives None."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, case in enumerate(cases):
        path = work_dir / f"case{index}.bin"
        write_case(path, case)
        paths.append(path)
    done = subprocess.run([str(driver), *map(str, paths)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    results = []
    for path, case in zip(paths, cases):
        out = path.with_suffix(".out")
        results.append(read_result(out, case) if out.is_file() else None)
    return done, results


def decision(case: MergeCase) -> Decision:
    """The exporter's decision of the same case (match_step), to judge a kernel's slots by."""
    metric = torch.from_numpy(case.metric)
    cls_attn = torch.from_numpy(case.cls_attn) if case.rule.name == "turbo" else None
    merge = match_step(case.rule, metric, case.r, protected=case.protected, cls_attn=cls_attn)
    return Decision(case.rule, metric, case.r, case.protected, cls_attn, None, None, merge.dst_slot)


def torch_merge(case: MergeCase, slots: np.ndarray | None = None) -> MergeResult:
    """The exporter's merge of the same case: match_step (or the given slots), then the shared
    size-weighted merge."""
    dst_slot = decision(case).slots if slots is None else torch.from_numpy(slots).to(torch.int64)
    merge = TokenMerge(dst_slot, case.x.shape[1] - case.r)
    x, size = merge.merge(torch.from_numpy(case.x), torch.from_numpy(case.size).unsqueeze(-1))
    return MergeResult(0, merge.dst_slot.to(torch.int32).numpy(), x.numpy(), size[..., 0].numpy())
