"""The SimilarityEnergyMerge CUDA kernels on a GPU, without TensorRT: correctness against the
exporter's reference on fresh random inputs, and timings against the same step as PyTorch ops.

    nvcc -O3 -shared -Xcompiler -fPIC -arch=native \\
        plugins/similarityEnergyMergePlugin/similarityEnergyMergeKernels.cu -o build/libtokenfuse_kernels.so
    python scripts/plugin_gpu_check.py build/libtokenfuse_kernels.so --out docs/plugin-gpu.json
    compute-sanitizer --tool memcheck python scripts/plugin_gpu_check.py build/libtokenfuse_kernels.so --quick

Correctness (per method and variant, fp32 and fp16, many seeds): the kernel's slots must equal the
reference's except where the reference's deciding scores are within `--tie` of each other; merged
x within 1e-4 (fp32) or 2e-2 relative (fp16) where the slots agree. Timing (ViT-B shapes: N = 197,
C = 768, D = 64, B in 1, 8, 32, 64): CUDA-event medians of the fused step and of the reference
step in PyTorch, and of one fp16 ViT-B block (attention + MLP) for scale.

Only torch is needed: tokenfuse's methods.py is loaded by path, so the package's other
dependencies (timm, onnx, ...) need not be installed on the GPU machine.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"tome": 0, "pitome": 1, "crossget": 2, "turbo": 3}
VARIANTS = {"plain": 0, "bsm": 1, "text": 2}
CASES = [("tome", "plain"), ("crossget", "plain"), ("turbo", "plain"), ("pitome", "plain"), ("pitome", "bsm"), ("pitome", "text")]


def load_methods():
    spec = importlib.util.spec_from_file_location("tokenfuse_methods", ROOT / "exporter" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class MergeParams(ctypes.Structure):
    """tokenfuse::MergeParams (similarityEnergyMergeKernels.h), field for field."""

    _fields_ = [(name, ctypes.c_int32) for name in ("method", "variant", "batch", "tokens", "out_tokens", "channels", "metric_dim", "protected")] + [
        (name, ctypes.c_float) for name in ("margin", "alpha", "turbo_weight")
    ]


class Kernels:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.tokenfuseMergeWorkspaceSize.restype = ctypes.c_size_t
        self.lib.tokenfuseMergeWorkspaceSize.argtypes = [ctypes.c_int32] * 3

    def merge(self, rule, out_tokens, protected, x, metric, size, cls_attn):
        batch, n, channels = x.shape
        params = MergeParams(METHODS[rule.name], VARIANTS[rule.variant], batch, n, out_tokens, channels, metric.shape[-1], protected,
                             rule.margin, rule.alpha, rule.turbo_weight)
        out_x = torch.empty(batch, out_tokens, channels, dtype=x.dtype, device=x.device)
        out_size = torch.empty(batch, out_tokens, 1, device=x.device)
        slots = torch.empty(batch, n, dtype=torch.int32, device=x.device)
        workspace = torch.empty(self.lib.tokenfuseMergeWorkspaceSize(batch, n, metric.shape[-1]), dtype=torch.uint8, device=x.device)
        entry = self.lib.tokenfuseMergeHalf if x.dtype == torch.float16 else self.lib.tokenfuseMergeFloat
        pointer = ctypes.c_void_p
        status = entry(ctypes.byref(params), pointer(x.data_ptr()), pointer(metric.data_ptr()), pointer(size.data_ptr()),
                       pointer(cls_attn.data_ptr() if cls_attn is not None else 0), pointer(out_x.data_ptr()), pointer(out_size.data_ptr()),
                       pointer(slots.data_ptr()), pointer(workspace.data_ptr()), pointer(torch.cuda.current_stream().cuda_stream))
        if status != 0:
            raise RuntimeError(f"kernel launch returned cudaError {status}")
        return out_x, out_size, slots


def inputs(rule, batch, n, channels, dim, dtype, generator):
    x = torch.randn(batch, n, channels, generator=generator).to(dtype)
    metric = torch.randn(batch, n, dim, generator=generator).to(dtype)
    size = torch.randint(1, 4, (batch, n, 1), generator=generator).float()
    cls_attn = torch.rand(batch, n, generator=generator).softmax(-1) if rule.name == "turbo" else None
    return x, metric, size, cls_attn


def correctness(kernels, methods, seeds: int, tie: float) -> list[dict]:
    rows = []
    for name, variant in CASES:
        rule = methods.LayerRule(name, margin=0.675, variant=variant, turbo_weight=12.5)
        for dtype in (torch.float32, torch.float16):
            agree = total = mismatched_rows = 0
            worst = 0.0
            for seed in range(seeds):
                generator = torch.Generator().manual_seed(seed)
                n = (197, 577, 1024)[seed % 3]
                protected = 1 + seed % 2
                r = (n - protected) // 2 if name == "pitome" else n // 4
                x, metric, size, cls_attn = inputs(rule, 4, n, 64 + 32 * (seed % 3), (64, 768)[seed % 2], dtype, generator)
                plan = methods.match_step(rule, metric, r, protected=protected, cls_attn=cls_attn)
                want_x, want_size = plan.merge(x, size)
                cuda = [t.cuda() if t is not None else None for t in (x, metric, size, cls_attn)]
                got_x, got_size, got_slots = kernels.merge(rule, n - r, protected, *cuda)
                got_slots = got_slots.cpu().long()
                same = (got_slots == plan.dst_slot).all(-1)
                agree += int((got_slots == plan.dst_slot).sum())
                total += got_slots.numel()
                mismatched_rows += int((~same).sum())
                if same.any():
                    error = (got_x.cpu().float()[same] - want_x.float()[same]).abs().max() / want_x.float().abs().max().clamp_min(1e-6)
                    worst = max(worst, float(error))
                    torch.testing.assert_close(got_size.cpu()[same], want_size[same])
            limit = 1e-4 if dtype == torch.float32 else 2e-2
            rows.append({"method": name, "variant": variant, "dtype": str(dtype).split(".")[-1], "slot_agreement": agree / total,
                         "rows_with_a_different_decision": mismatched_rows, "max_rel_error_same_decisions": worst, "limit": limit,
                         "passed": worst <= limit and (dtype == torch.float16 or agree / total >= 1 - tie)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def timed(fn, repeats=50) -> float:
    """Median milliseconds of `fn` on the current stream (CUDA events)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def timings(kernels, methods) -> list[dict]:
    rows = []
    block = vit_block()
    for name, variant in CASES:
        rule = methods.LayerRule(name, margin=0.675, variant=variant, turbo_weight=12.5)
        for batch in (1, 8, 32, 64):
            generator = torch.Generator().manual_seed(0)
            x, metric, size, cls_attn = (t.cuda() if t is not None else None for t in inputs(rule, batch, 197, 768, 64, torch.float16, generator))
            r = 19
            fused = timed(lambda: kernels.merge(rule, 197 - r, 1, x, metric, size, cls_attn))
            torch_ops = timed(lambda: methods.match_step(rule, metric, r, protected=1, cls_attn=cls_attn).merge(x, size))
            layer = timed(lambda: block(x))
            rows.append({"method": name, "variant": variant, "batch": batch, "fused_ms": fused, "pytorch_ops_ms": torch_ops,
                         "speedup": torch_ops / fused, "vit_b_layer_ms": layer, "share_of_layer": fused / layer})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def vit_block():
    """One ViT-B block (pre-norm attention + MLP, fp16) for the scale of a layer."""
    layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, activation="gelu", batch_first=True, norm_first=True, dropout=0.0)
    return layer.half().cuda().eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", help="a library with the kernels' C entry points (the plugin library or the nvcc line above)")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--tie", type=float, default=1e-3, help="fp32: the share of slots allowed to differ (near-ties)")
    parser.add_argument("--quick", action="store_true", help="a few seeds and no timings (for compute-sanitizer)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check runs the kernels on a GPU")
    methods, kernels = load_methods(), Kernels(args.library)
    with torch.no_grad():
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "correctness": correctness(kernels, methods, 3 if args.quick else args.seeds, args.tie)}
        if not args.quick:
            result["timings"] = timings(kernels, methods)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    failed = [row for row in result["correctness"] if not row["passed"]]
    print(f"{len(failed)} of {len(result['correctness'])} correctness rows failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
