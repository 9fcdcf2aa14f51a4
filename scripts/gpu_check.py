"""Every GPU measurement of tokenfuse in one call, within a deadline it enforces itself.

    bash scripts/gpu_check.sh                       # on a bare GPU machine, from the repository root
    python scripts/gpu_check.py --dry --out DIR     # the same steps on a CPU at tiny sizes (CI rehearses it)

Needs only what the lent GPU machine has (torch with CUDA, nvcc, compute-sanitizer, timm,
transformers, onnx); tokenfuse comes from this checkout. Steps, in order; each result is written as
soon as it exists, and a step that fails records its error and the next one runs:
 1. versions: device, driver, nvcc, Python and packages;
 2. plugin-correctness: the kernels built for this GPU against the exporter's PyTorch merge (exact
    ties identical; random and non-finite inputs right up to near-ties), fp32 and fp16;
 3. plugin-timing: each method's kernel and the same merge in PyTorch's standard ops against
    ViT-B/16's own fp16 block at B 1/8/32/64, N 197 (CUDA graph replays, inputs rotated past L2);
 4. torch-models: tokenfuse's patched ViT-B/16 and all-MiniLM-L6-v2 (its configuration, seq 128),
    merged against unmerged and the library's own model, fp16, eager and CUDA graphs, B 1/8/32/64,
    variants interleaved;
 5. sanitizers: compute-sanitizer memcheck and racecheck on the quick correctness inputs, each bounded;
 6. torch-compile: if time is left, fullgraph torch.compile (reduce-overhead) of the ViT at batch 8.
Everything goes to three files under --out ($OUT): gpu-check.json (every figure, rewritten after each
step), gpu-check.md (the tables) and gpu-check.log (the output). The device tool returns at most 8 files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from tokenfuse.engines import torch_bench
from tokenfuse.exporter.errors import UsageError
from tokenfuse.plugins import nvcc_path
from tokenfuse.plugins import gpu_check as plugin

# Seconds each step may take at most (the deadline may cut a step shorter); their sum fits the
# default 8-minute deadline with room for the machine's first CUDA initialisation.
BUDGETS = {"versions": 20, "plugin-correctness": 90, "plugin-timing": 60, "torch-models": 180, "sanitizers": 80, "torch-compile": 60}
FILES = ("gpu-check.json", "gpu-check.md", "gpu-check.log")


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Run:
    """The results so far, written after every step (and every timed row) to --out."""

    def __init__(self, out: Path, dry: bool, deadline: Deadline):
        self.out, self.dry, self.deadline = out, dry, deadline
        self.report = {"dry": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "deadline_s": round(deadline.left()), "steps": {}}

    def step(self, name: str, fn) -> None:
        budget = min(BUDGETS[name], self.deadline.left())
        if budget <= 5:
            self.report["steps"][name] = {"status": "skipped", "reason": "out of time"}
            self.write()
            return
        started = time.monotonic()
        step_end = started + budget
        print(f"== {name} (at most {budget:.0f} s)", flush=True)
        entry = self.report["steps"][name] = {"status": "running"}
        try:
            result = fn(lambda: time.monotonic() > step_end, lambda partial: self._partial(name, partial), budget)
            entry.update({"status": "ok", **result})
        except Exception as error:  # recorded; the next step runs
            entry.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-2000:])
            print(entry["error"], flush=True)
        entry["seconds"] = round(time.monotonic() - started, 1)
        self.write()

    def _partial(self, name: str, partial: dict) -> None:
        self.report["steps"][name].update(partial)
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.out / FILES[0], json.dumps(self.report, indent=1, default=str)), (self.out / FILES[1], markdown(self.report))):
            partial = path.with_suffix(path.suffix + ".part")
            partial.write_text(text)
            partial.replace(path)


def no_cuda() -> dict:
    return {"status": "no CUDA", "status_detail": "this step runs on a GPU only"}


# ---- the steps ----------------------------------------------------------------------------------

def versions(stop, partial, budget) -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
             "host": platform.node(), "cuda_available": torch.cuda.is_available()}
    for module in ("timm", "transformers", "onnx", "onnxruntime", "numpy"):
        with contextlib.suppress(ImportError):
            found[module] = __import__(module).__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(device=props.name, capability=f"sm_{props.major}{props.minor}", multiprocessors=props.multi_processor_count,
                     memory_gib=round(props.total_memory / 2**30, 1), l2_mib=getattr(props, "L2_cache_size", 0) / 2**20)
    smi = shutil.which("nvidia-smi")
    if smi:
        found["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=15).stdout.strip()
    with contextlib.suppress(UsageError, OSError, subprocess.SubprocessError):
        found["nvcc"] = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True, timeout=15).stdout.strip().splitlines()[-1]
    return found


class Kernels:
    """The kernels library, built once for this GPU (steps 2, 3 and 5 share it)."""

    library: Path | None = None

    @classmethod
    def get(cls):
        if cls.library is None:
            cls.library = plugin.build_kernels()
        return plugin.Kernels(cls.library)


def plugin_correctness(stop, partial, budget) -> dict:
    if not torch.cuda.is_available():
        return no_cuda()
    kernels = Kernels.get()
    with torch.no_grad():
        rows = plugin.correctness(kernels, quick=False, stop=stop)
    return {"rows": rows, "passed": all(row["passed"] for row in rows), "complete": not stop()}


def plugin_timing(stop, partial, budget) -> dict:
    if not torch.cuda.is_available():
        return no_cuda()
    rows = plugin.timings(Kernels.get(), deadline=stop, on_row=lambda rows: partial({"rows": rows}))
    return {"rows": rows}


def patched_models(dry: bool, names, modes, batches, stop, on_row=None, input_sets: int = 4) -> dict:
    """torch_bench.bench: fp16 with inductor on the GPU; in a dry run, its tiny models in fp32
    on the CPU (the eager backend)."""
    if not dry and not torch.cuda.is_available():
        return no_cuda()
    options = (torch_bench.Options(backend="eager", rounds=3, max_seconds=1.0, warmup=1, input_sets=2, tiny=True) if dry
               else torch_bench.Options(rounds=30, max_seconds=6.0, input_sets=input_sets))
    device, dtype = (torch.device("cpu"), "fp32") if dry else (torch.device("cuda"), "fp16")
    return {"report": torch_bench.bench(names, modes, batches, dtype, device, options, on_row=on_row, deadline=stop)}


def torch_models(stop, partial, budget, dry: bool) -> dict:
    return patched_models(dry, ["vit-b", "minilm"], ["eager"] if dry else ["eager", "graphs"], [1, 2] if dry else [1, 8, 32, 64],
                          stop, on_row=lambda report: partial({"report": report}))


def sanitizers(stop, partial, budget) -> dict:
    if not torch.cuda.is_available():
        return no_cuda()
    Kernels.get()
    tools = ("memcheck", "racecheck")
    return {"tools": plugin.run_sanitizers(Kernels.library, tools=tools, timeout=max(budget / len(tools) - 2, 5))}


def torch_compile(stop, partial, budget, dry: bool) -> dict:
    return patched_models(dry, ["vit-b"], ["compile"], [2 if dry else 8], stop, input_sets=2)


# ---- the summary --------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    steps = report["steps"]
    lines = ["# tokenfuse on a GPU: scripts/gpu_check.py" + (" (dry run on a CPU)" if report["dry"] else ""), "",
             f"Started {report['started']}, deadline {report['deadline_s']} s.", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {entry.get('status')}{': ' + entry['error'] if 'error' in entry else ''}"
              f"{' (' + entry['status_detail'] + ')' if 'status_detail' in entry else ''} | {entry.get('seconds', '')} |"
              for name, entry in steps.items()]
    found = steps.get("versions", {})
    if found.get("status") == "ok":
        lines += ["", "## Versions", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in found.items() if key not in ("status", "seconds")]
    correctness = steps.get("plugin-correctness", {}).get("rows")
    timing = steps.get("plugin-timing", {}).get("rows")
    tools = steps.get("sanitizers", {}).get("tools", {})
    if correctness or timing or tools:
        text = plugin.markdown_report({}, correctness or [], timing or [], tools, "python scripts/gpu_check.py")
        lines += ["", text.split("\n", 6)[-1]]
    for name in ("torch-models", "torch-compile"):
        bench = steps.get(name, {}).get("report")
        if bench and bench.get("models"):
            lines += ["", f"## {name}", "", torch_bench.markdown(bench)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where the three result files go ($OUT on the device machine)")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for the whole run (default 480: 8 minutes)")
    parser.add_argument("--dry", action="store_true", help="no GPU: every step's CPU path at tiny sizes, or 'no CUDA'")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry for the CPU rehearsal")
    run = Run(args.out, args.dry, Deadline(args.deadline))
    log = args.out / FILES[2]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle, contextlib.redirect_stdout(Tee(sys.stdout, handle)), contextlib.redirect_stderr(Tee(sys.stderr, handle)):
        run.write()
        run.step("versions", versions)
        run.step("plugin-correctness", plugin_correctness)
        run.step("plugin-timing", plugin_timing)
        run.step("torch-models", lambda stop, partial, budget: torch_models(stop, partial, budget, args.dry))
        run.step("sanitizers", sanitizers)
        run.step("torch-compile", lambda stop, partial, budget: torch_compile(stop, partial, budget, args.dry))
        print(f"done in {args.deadline - run.deadline.left():.0f} s; results in {args.out}", flush=True)
    return 0


class Tee(io.TextIOBase):
    """Writes to several streams (the terminal and the log)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


if __name__ == "__main__":
    sys.exit(main())
