"""Whole models in PyTorch through tokenfuse's patched model: merged against unmerged, one run.
The GPU check (scripts/gpu_check.sh) runs it on a GPU; tests run it on the CPU with tiny models.

Variants, timed call by call in turn (each sees the same noise, bench.interleave), medians:
* original: the library's own model (timm's fused attention, Hugging Face's SDPA);
* none: the same model patched with --method none (tokenfuse's encoder, no merge; attention
  "auto", which is PyTorch's fused SDPA on a GPU);
* explicit: none with attention="explicit" (MatMul-Softmax-MatMul, as exports write it), to show
  what the fused attention is worth;
* pitome r=0.9 and tome (ViT: r=13; MiniLM: the integer r whose FLOPs are nearest PiToMe's).
Modes: eager; graphs (the eager model captured in a CUDA graph); compile (torch.compile with
fullgraph=True, mode reduce-overhead: inductor plus CUDA graph trees on a GPU). Compiled variants
must trace to one graph (a graph break raises) and must not recompile while they are timed
(torch.compiler.set_stance("fail_on_recompile")); each variant's output is compared with its eager
output. Weights are random (nothing downloads): speed does not depend on them, and the schedule,
hence the work, is fixed by the budget. MiniLM is all-MiniLM-L6-v2's configuration at seq 128.
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass

import torch

from ..exporter import MergeOptions, UsageError, patch
from ..exporter.adapters import adapter_for
from ..exporter.onnx_export import DTYPES
from .bench import gpu, interleave, percentiles

MODES = ("eager", "graphs", "compile")
MODELS = ("vit-b", "minilm")
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522,
              max_position_embeddings=512)  # sentence-transformers/all-MiniLM-L6-v2's config.json
SEQ_LEN = 128


def build(name: str, tiny: bool):
    """The original model (eval, random weights) and a function making its inputs for a batch size."""
    torch.manual_seed(0)
    if name == "vit-b":
        import timm

        options = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=2) if tiny else {}
        model = timm.create_model("vit_base_patch16_224", pretrained=False, **options)
        size = model.patch_embed.img_size

        def inputs(batch, generator):
            return {"x": torch.randn(batch, 3, *size, generator=generator)}

        return model.eval(), inputs
    import transformers as tf

    config = dict(MINILM, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96) if tiny else MINILM
    model = tf.BertModel(tf.BertConfig(**config), add_pooling_layer=False)
    seq_len = 32 if tiny else SEQ_LEN

    def inputs(batch, generator):
        ids = torch.randint(1000, config["vocab_size"], (batch, seq_len), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model.eval(), inputs


def tome_r_matching(model, sample: dict, target_ratio: float) -> int:
    """The integer ToMe r whose FLOPs ratio is nearest `target_ratio` (ties: the smaller r)."""
    best = None
    for r in range(1, 64):
        try:
            ratio = flops_ratio(model, sample, "tome", r)
        except UsageError:
            break
        if best is None or abs(ratio - target_ratio) < best[0]:
            best = (abs(ratio - target_ratio), r)
    return best[1]


def flops_ratio(model, sample: dict, method: str, r) -> float:
    """Whole-model FLOPs (embedding, head and merges included) over the unmerged model's."""
    adapter = adapter_for(model)
    adapter = adapter.for_inputs(adapter.bind(**sample))
    return MergeOptions(method=method, r=r).resolve(adapter)[1].whole_model_ratio


def variants(name: str, tiny: bool, dtype, device):
    """name -> (model, budget) for original, explicit, none, pitome and tome, each its own copy;
    and the function making the models' inputs."""
    original, make_inputs = build(name, tiny)
    sample = make_inputs(1, torch.Generator().manual_seed(0))
    pitome_ratio = flops_ratio(original, sample, "pitome", 0.9)
    tome_r = 13 if name == "vit-b" and not tiny else tome_r_matching(original, sample, pitome_ratio)
    out = {"original": (original, {"flops_ratio": 1.0})}
    for key, method, r, attention in (("explicit", "none", None, "explicit"), ("none", "none", None, "auto"),
                                      ("pitome", "pitome", 0.9, "auto"), ("tome", "tome", tome_r, "auto")):
        model, _ = build(name, tiny)
        out[key] = (patch(model, method=method, r=r, attention=attention),
                    {"r": r, "flops_ratio": 1.0 if method == "none" else flops_ratio(original, sample, method, r)})
    return {key: (model.to(device=device, dtype=dtype), budget) for key, (model, budget) in out.items()}, make_inputs


def primary(result) -> torch.Tensor:
    """The output compared and kept: the tensor itself, or the last hidden states of a dict-like
    result (Hugging Face's ModelOutput, a patched text model's dict)."""
    if isinstance(result, torch.Tensor):
        return result
    return result["last_hidden_state"] if "last_hidden_state" in result else result[0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Graphed:
    """The eager model captured in one CUDA graph for fixed input buffers; a call copies the
    inputs in and replays (the copy is part of the timed call, as it is for a served model)."""

    def __init__(self, model, example: dict):
        self.static = {k: v.clone() for k, v in example.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(**self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = primary(model(**self.static))

    def __call__(self, **inputs):
        for key, value in inputs.items():
            self.static[key].copy_(value)
        self.graph.replay()
        return self.output


def prepare(mode: str, models: dict, example: dict, backend: str, compiled: dict) -> dict:
    """name -> callable for `mode`. Compiled models are made once per model and mode and kept in
    `compiled`; each batch size compiles its own static graph (dynamic=False: tracing the merges
    with a symbolic batch took 30 times as long)."""
    if mode == "eager":
        return {name: model for name, (model, _) in models.items()}
    if mode == "graphs":
        return {name: Graphed(model, example) for name, (model, _) in models.items()}
    if not compiled:
        torch._dynamo.reset()
        options = {"mode": "reduce-overhead"} if backend == "inductor" and example_device(example).type == "cuda" else {}
        compiled.update({name: torch.compile(model, fullgraph=True, dynamic=False, backend=backend, **options) for name, (model, _) in models.items()})
    return compiled


def example_device(example: dict) -> torch.device:
    return next(iter(example.values())).device


def measure(callables: dict, input_sets: list[dict], device, options: "Options") -> tuple[dict, bool]:
    """Each callable's call times (ms) and whether they settled, interleaved call by call over the input sets (bench.interleave),
    each call timed to the device's end of its work."""
    for _ in range(options.warmup):
        for fn in callables.values():
            for feeds in input_sets:
                fn(**feeds)
    sync(device)

    def timed(fn):
        def call(index):
            fn(**input_sets[index])
            sync(device)
        return call

    samples, _, stable = interleave({name: timed(fn) for name, fn in callables.items()}, len(input_sets), min_rounds=options.rounds,
                                    max_seconds=options.max_seconds, tolerance=options.tolerance)
    return {name: percentiles([t for s in per_feed for t in s]) for name, per_feed in samples.items()}, stable


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@dataclass
class Options:
    """How to measure: the torch.compile backend (eager: trace only, for a CPU smoke run), the fewest
    interleaved rounds and the time limit per configuration, warm-up calls, input sets rotated
    between calls (so no call reads what the last one left in cache), tiny models of the same families."""

    backend: str = "inductor"
    rounds: int = 30
    max_seconds: float = 20.0
    tolerance: float = 0.02
    warmup: int = 3
    input_sets: int = 4
    tiny: bool = False


def run_config(models: dict, mode: str, batch: int, make_inputs, device, dtype, args: Options, compiled: dict) -> dict:
    """One (model, mode, batch): prepare every variant, check it, then time them interleaved."""
    gen = torch.Generator().manual_seed(batch)
    input_sets = [{k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in make_inputs(batch, gen).items()}
                  for _ in range(args.input_sets)]
    with torch.no_grad():
        eager_out = {name: primary(model(**input_sets[0])).clone() for name, (model, _) in models.items()}
        started = time.perf_counter()
        callables = prepare(mode, models, input_sets[0], args.backend, compiled)
        checks = {}
        for name, fn in callables.items():
            for _ in range(3):  # compiled: trace and compile; reduce-overhead records its CUDA graph by the 3rd call
                out = primary(fn(**input_sets[0])).clone()
            sync(device)
            checks[name] = {"ready_s": time.perf_counter() - started, "error_vs_eager": relative_error(out, eager_out[name])}
            started = time.perf_counter()
        recompiled = None
        try:
            with torch.compiler.set_stance("fail_on_recompile") if mode == "compile" else contextlib.nullcontext():
                timings, stable = measure(callables, input_sets, device, args)
        except RuntimeError as error:  # a recompile while timing: record it, time again without the stance
            recompiled = str(error).splitlines()[0]
            print(f"recompiled while timing: {recompiled}", flush=True)
            timings, stable = measure(callables, input_sets, device, args)
    return {"timings": timings, "stable": stable, "checks": checks, "recompiled_while_timing": recompiled,
            "output_error_none_vs_original": relative_error(eager_out["none"], eager_out["original"])}


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    for module in ("timm", "transformers", "triton"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, multiprocessors=props.multi_processor_count, cuda_runtime=torch.version.cuda,
                   driver=(gpu() or {}).get("driver"))
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    where = env.get("gpu") or env.get("cpu")
    lines = [f"PyTorch {env['torch']} on {where} (driver {env.get('driver', 'n/a')}, CUDA {env.get('cuda_runtime', 'n/a')}), "
             f"{report['dtype']}, backend {report['backend']}; medians of interleaved calls ({report['rounds']} rounds or more, until stable or {report['max_seconds']:.0f} s).", ""]
    for model in report["models"]:
        budgets = model["budgets"]
        lines += [f"### {model['name']}", "",
                  "FLOPs ratios (whole model): " + ", ".join(f"{k} {v['flops_ratio']:.3f}" + (f" (r={v['r']})" if v.get("r") else "")
                                                          for k, v in budgets.items()), "",
                  "| mode | batch | original ms | explicit ms | none ms | pitome ms | tome ms | pitome speedup vs original / none | FLOPs ideal (realised) | tome speedup vs original / none | FLOPs ideal (realised) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in model["rows"]:
            t = {k: v["p50_ms"] for k, v in row["timings"].items()}
            cells = [row["mode"], str(row["batch"])] + [f"{t[k]:.2f}" for k in ("original", "explicit", "none", "pitome", "tome")]
            for method in ("pitome", "tome"):
                ideal = 1 / budgets[method]["flops_ratio"]
                vs_original, vs_none = t["original"] / t[method], t["none"] / t[method]
                cells += [f"{vs_original:.2f}x / {vs_none:.2f}x", f"{ideal:.2f}x ({vs_original / ideal:.0%})"]
            lines.append("| " + " | ".join(cells) + " |")
        rows = model["rows"]
        if not rows:
            lines += ["", "No configuration completed: " + "; ".join(model.get("errors", []) + model.get("skipped", [])), ""]
            continue
        worst = max(check["error_vs_eager"] for row in rows if row["mode"] != "eager" for check in row["checks"].values()) if any(
            row["mode"] != "eager" for row in rows) else None
        recompiles = [f"{row['mode']} B={row['batch']}" for row in rows if row["recompiled_while_timing"]]
        lines += ["", f"Checks: none against original, relative error at most {max(row['output_error_none_vs_original'] for row in rows):.1e}; "
                  + (f"graphed and compiled outputs against eager at most {worst:.1e}; " if worst is not None else "")
                  + (f"recompiled while timing: {', '.join(recompiles)}." if recompiles else "no recompiles while timing."), ""]
    return "\n".join(lines)


def bench(names, modes, batches, dtype_name: str, device, args: Options, on_row=None, deadline=None) -> dict:
    """Every (model, mode, batch) in turn, in `dtype_name` (fp32, fp16); a configuration that fails
    records its error and the next one runs. Each compiled batch size starts from a fresh dynamo
    cache (one static graph per variant and batch: several batch sizes in one cache ran into the
    recompile limit)."""
    dtype = DTYPES[dtype_name]
    report = {"environment": environment(device), "dtype": dtype_name, "backend": args.backend,
              "rounds": args.rounds, "max_seconds": args.max_seconds, "tiny": args.tiny, "models": []}
    for name in names:
        models, make_inputs = variants(name, args.tiny, dtype, device)
        entry = {"name": name, "budgets": {k: budget for k, (_, budget) in models.items()}, "rows": []}
        report["models"].append(entry)
        for mode in modes:
            for batch in batches:
                if deadline is not None and deadline():
                    entry.setdefault("skipped", []).append(f"{mode} B={batch}: out of time")
                    continue
                started = time.perf_counter()
                try:
                    row = run_config(models, mode, batch, make_inputs, device, dtype, args, compiled={})
                except Exception as error:  # recorded; the next configuration runs
                    entry.setdefault("errors", []).append(f"{mode} B={batch}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                    print(f"{name} {mode} B={batch}: {entry['errors'][-1]}", flush=True)
                    continue
                entry["rows"].append({"mode": mode, "batch": batch, **row})
                t = {k: v["p50_ms"] for k, v in row["timings"].items()}
                print(f"{name} {mode} B={batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in t.items())
                      + f"  [{time.perf_counter() - started:.0f} s]", flush=True)
                if on_row:
                    on_row(report)
    return report
