"""ONNX export with TensorRT-compatibility checks, validation in ONNX Runtime, and the manifest.

The graph is traced once with each merging layer's slot assignment as extra outputs; validation
runs that graph in ONNX Runtime against the merged PyTorch model, and the shipped file is the same
graph with those extra outputs dropped. Files are written to temporaries and renamed into place
only when everything passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses

import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from .adapters import Adapter
from .budgets import BudgetReport
from .encoder import MergeSettings
from .errors import UsageError
from .files import atomic_outputs
from .manifest import SCHEMA_VERSION
from . import agreement, plugin_lowering

DEFAULT_OPSET = 18
# Validation fails outside these (docs/validation.md says what each measures).
# - near_tie: how far apart two scores (cosines, energies, ToMe priorities) may be for either order
#   to count as right; fp32 runtimes differ by ~1e-6 on a layer's scores, fp16 ones by ~1e-3.
# - merge_agreement: the share of tokens whose slot is right up to near-ties, in the worst layer.
# - same decisions (ONNX Runtime's, replayed in PyTorch): max_abs_error (fp32) or max_rel_error
#   (fp16, relative to each output's largest value) over every output, and cosine_min per sample.
# - free-running (each runtime its own decisions), on the outputs users get (pooled embeddings,
#   logits; not the token outputs, whose order legitimately differs): per-sample cosine and the
#   largest error relative to the output's largest value.
TOLERANCES = {
    "fp32": {"near_tie": 1e-4, "merge_agreement": 0.999, "max_abs_error": 1e-3, "max_rel_error": None, "cosine_min": 0.9999,
             "free_running_cosine_min": 0.99, "free_running_max_rel_error": 0.1},
    "fp16": {"near_tie": 1e-2, "merge_agreement": 0.99, "max_abs_error": None, "max_rel_error": 2e-2, "cosine_min": 0.999,
             "free_running_cosine_min": 0.98, "free_running_max_rel_error": 0.25},
}
LOWER_BOUNDS = {"cosine_min", "merge_agreement", "free_running_cosine_min"}  # the other gates are upper bounds
GATES = ("merge_agreement", "max_abs_error", "max_rel_error", "cosine_min", "free_running_cosine_min", "free_running_max_rel_error")
TOKEN_OUTPUTS = ("last_hidden_state", "token_sizes", "token_mask")  # per token: their order depends on the decisions
VALIDATION_INPUTS = (("random", 1), ("random", 3), ("natural", 3))  # (kind, batch): the adapter's <kind>_inputs
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOPK_LIMIT = 3840  # TensorRT's largest TopK K
PROTOBUF_LIMIT = 2**31 - 2**24  # one ONNX protobuf, with room for the graph itself


class _Traced(torch.nn.Module):
    """The merged model as a module with positional inputs and a flat tuple of outputs."""

    def __init__(self, adapter: Adapter, settings: MergeSettings, with_slots: bool):
        super().__init__()
        self.adapter, self.settings, self.with_slots = adapter, settings, with_slots
        self.model = adapter.model  # registers the parameters
        self.input_names = [spec.name for spec in adapter.input_specs()]

    def forward(self, *inputs):
        outputs, state = self.adapter.run(self.settings, dict(zip(self.input_names, inputs)))
        slots = tuple(state.slots) if self.with_slots else ()
        return tuple(outputs.values()) + slots


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Ops that TensorRT's ONNX parser does not import natively."""
    problems = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("ScatterElements", "ScatterND") and attrs.get("reduction", b"none") not in (b"none", "none"):
            problems.append(f"{node.op_type} with reduction {attrs['reduction']!r} ({node.name})")
        if node.op_type in ("Sort", "ArgSort"):
            problems.append(f"{node.op_type} ({node.name})")
        if node.op_type == "TopK":
            problems.append(f"TopK ({node.name}): K must be checked < {TOPK_LIMIT}")
    return problems


def trace(adapter: Adapter, settings: MergeSettings, path: Path, opset: int) -> onnx.ModelProto:
    """Export with slot outputs (for validation); returns the loaded ONNX model."""
    traced = _Traced(adapter, settings, with_slots=True).eval()
    example = adapter.random_inputs(2, torch.Generator().manual_seed(0))
    specs = adapter.input_specs()
    with torch.no_grad():
        outputs, state = adapter.run(settings, example)
    names = list(outputs)
    slot_names = [f"merge_slots.{i}" for i in range(len(state.slots))]
    dynamic = {spec.name: {0: "batch"} for spec in specs}
    dynamic.update({name: {0: "batch"} for name in names + slot_names})
    with warnings.catch_warnings(), torch.no_grad(), plugin_lowering.recording() as merge_nodes:
        warnings.simplefilter("ignore")
        # The TorchScript exporter: fast on small CPUs and exact for static token budgets.
        torch.onnx.export(
            traced,
            tuple(example[spec.name] for spec in specs),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[spec.name for spec in specs],
            output_names=names + slot_names,
            dynamic_axes=dynamic,
        )
    model = onnx.load(str(path))
    if settings.lowering == "onnx":
        model = fold_constants(model)
    # Only the batch axis is dynamic: write the static token counts into the output shapes.
    for value, tensor in zip(model.graph.output, list(outputs.values()) + state.slots):
        for dim, size in zip(list(value.type.tensor_type.shape.dim)[1:], tensor.shape[1:]):
            dim.Clear()
            dim.dim_value = size
    if settings.lowering == "plugin":
        plugin_lowering.attach_functions(model, merge_nodes, opset)
    onnx.save(model, str(path))
    return model


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every subgraph that does not depend on the inputs computed once (the
    merge's constant tables and masks, the static shapes): what ONNX Runtime and TensorRT would
    otherwise fold each time they open it (~40% of a merged text graph's nodes)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup()
    return gs.export_onnx(graph)


def strip_slots(model: onnx.ModelProto) -> onnx.ModelProto:
    shipped = onnx.ModelProto()
    shipped.CopyFrom(model)
    keep = [o for o in shipped.graph.output if not o.name.startswith("merge_slots.")]
    del shipped.graph.output[:]
    shipped.graph.output.extend(keep)
    return shipped


def _errors(expected: dict, got: dict) -> tuple[float, float, float]:
    """Max abs error over `expected`'s outputs, the same relative to each output's largest value,
    and the smallest per-sample cosine over them."""
    error, relative, cosine = 0.0, 0.0, 1.0
    for name, value in expected.items():
        ref = value.numpy().astype(np.float64).reshape(len(value), -1)
        out = got[name].astype(np.float64).reshape(len(ref), -1)
        diff = float(np.abs(out - ref).max())
        error, relative = max(error, diff), max(relative, diff / max(float(np.abs(ref).max()), 1e-12))
        cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30)
        cosine = min(cosine, float(np.where(np.linalg.norm(ref, axis=1) > 0, cos, 1.0).min()))
    return error, relative, cosine


def _validate_case(adapter: Adapter, settings: MergeSettings, session, inputs: dict, near_tie: float) -> dict:
    """One input batch: ONNX Runtime's outputs and decisions against PyTorch's."""
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})))
    ort_slots = [torch.from_numpy(got[n]) for n in names if n.startswith("merge_slots.")]
    with torch.no_grad():
        free, _ = adapter.run(settings, inputs)
        replayed, state = adapter.run(settings, inputs, replay=ort_slots)
    layers = [agreement.judge(decision, theirs, near_tie) for decision, theirs in zip(state.decisions, ort_slots)]
    error, relative, cosine = _errors(replayed, got)
    users = {name: value for name, value in free.items() if name not in TOKEN_OUTPUTS}
    _, free_relative, free_cosine = _errors(users, got)
    return {
        "max_abs_error": error,
        "max_rel_error": relative,
        "cosine_min": cosine,
        "merge_agreement": min((a.near_tie_aware for a in layers), default=1.0),
        "merge_agreement_raw": min((a.raw for a in layers), default=1.0),
        "near_ties_excused": sum(a.excused for a in layers),
        "merge_agreement_by_layer": [a.near_tie_aware for a in layers],
        "free_running_cosine_min": free_cosine,
        "free_running_max_rel_error": free_relative,
        "free_running_outputs": list(users),
    }


def validate(adapter: Adapter, settings: MergeSettings, onnx_path: Path, seed: int | None = None, dtype: str = "fp32") -> dict:
    """ONNX Runtime (CPU) vs the merged PyTorch model on fresh inputs: random ones and ones with
    real inputs' statistics (VALIDATION_INPUTS).

    Merge decisions are discrete: where two scores tie to within float rounding, ONNX Runtime and
    PyTorch may choose differently, and from that layer on the two models see different tokens.
    So PyTorch replays ONNX Runtime's decisions layer by layer while still making its own on the
    same layer input: ONNX Runtime's decisions must be right up to near-ties on PyTorch's scores
    (agreement.judge), and the outputs with the same decisions must match closely. Free-running
    (each its own decisions), the outputs users get must still agree.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # As many threads as the PyTorch side (one setting, torch.set_num_threads, bounds the whole
    # validation), and no spinning: the two runtimes take turns, so a spinning pool only burns CPU.
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    seed = int(time.time_ns() % 2**31) if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    limits = TOLERANCES[dtype]
    cases = {}
    for kind, batch in VALIDATION_INPUTS:
        inputs = getattr(adapter, f"{kind}_inputs")(batch, generator)
        cases[f"{kind}-{batch}"] = _validate_case(adapter, settings, session, inputs, limits["near_tie"])
    report = {"seed": seed, "cases": cases}
    for key in GATES:
        values = [case[key] for case in cases.values()]
        report[key] = min(values) if key in LOWER_BOUNDS else max(values)
    report["merge_agreement_raw"] = min(case["merge_agreement_raw"] for case in cases.values())
    report["near_ties_excused"] = sum(case["near_ties_excused"] for case in cases.values())
    report["tolerance"] = limits
    report["failures"] = [
        f"{key} {report[key]:.3g} ({'at least' if key in LOWER_BOUNDS else 'at most'} {limits[key]})"
        for key in GATES
        if limits[key] is not None and (report[key] < limits[key] if key in LOWER_BOUNDS else report[key] > limits[key])
    ]
    report["passed"] = not report["failures"]
    return report


def validate_under_seeds(adapter: Adapter, settings: MergeSettings, seeds, dtype: str = "fp32", opset: int = DEFAULT_OPSET) -> list[dict]:
    """Trace the merged model once, as export_onnx does, and validate that one graph under each seed
    (does an export pass or fail by the luck of its validation seed?)."""
    settings = dataclasses.replace(settings, attention="explicit")  # what export_onnx traces and validates
    with tempfile.TemporaryDirectory(prefix="tokenfuse-") as work:
        path = Path(work, "traced.onnx")
        trace(adapter, settings, path, opset)
        return [validate(adapter, settings, path, seed=seed, dtype=dtype) for seed in seeds]


def io_spec(model: onnx.ModelProto) -> dict:
    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def manifest(adapter: Adapter, settings: MergeSettings, report: BudgetReport, model: onnx.ModelProto, opset: int, dtype: str, validation, extra: dict) -> dict:
    method = settings.method
    return {
        "schema_version": SCHEMA_VERSION,
        "tokenfuse_version": __version__,
        "model": adapter.name,
        "family": adapter.family,
        "method": method.name,
        "settings": {
            **extra,
            **method.knobs,
            "protected_tokens": settings.protected,
            "proportional_attention": settings.prop_attn,
            "metric": settings.metric,
        },
        "budget": report.to_json(),
        "schedule": list(settings.schedule),
        "preprocess": adapter.preprocess(),
        **({"pooling": adapter.pooling.to_json()} if adapter.pooling else {}),
        "opset": opset,
        "dtype": dtype,
        "lowering": settings.lowering,
        **({"plugin": plugin_info(model)} if settings.lowering == "plugin" else {}),
        **io_spec(model),
        "validation": validation,
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "python": platform.python_version()},
    }


def plugin_info(model: onnx.ModelProto) -> dict:
    """What an engine build needs to know about the plugin nodes."""
    nodes = [n for n in model.graph.node if n.op_type == plugin_lowering.OP_TYPE]
    return {"op_type": plugin_lowering.OP_TYPE, "namespace": plugin_lowering.DOMAIN, "version": plugin_lowering.VERSION, "nodes": len(nodes)}


def check_request(adapter: Adapter, output: Path, opset: int, dtype: str):
    """The checks every export makes before tracing; converts the model to `dtype`."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}")
    if opset < 17:
        raise UsageError(f"--opset {opset}: tokenfuse needs opset >= 17 (LayerNormalization)")
    if output.suffix != ".onnx":
        raise UsageError(f"-o {output}: the output must end in .onnx (the manifest goes beside it as .json)")
    weight_bytes = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
    if weight_bytes >= PROTOBUF_LIMIT:
        raise UsageError(f"{adapter.name} has {weight_bytes / 2**30:.1f} GiB of weights; ONNX files over 2 GiB (external data) are not supported yet")
    adapter.model.to(DTYPES[dtype])


def build_graph(adapter: Adapter, settings: MergeSettings, report: BudgetReport, work: Path, *, opset: int, dtype: str,
                run_validation: bool, seed: int | None, extra: dict, log) -> tuple[onnx.ModelProto, dict]:
    """Trace, check and validate one graph in `work`; return the graph to ship and its manifest."""
    settings = dataclasses.replace(settings, attention="explicit")  # the pattern TensorRT fuses, also in validation
    traced_path = Path(work, "traced.onnx")
    started = time.time()
    log(f"[1/3] tracing {adapter.name} ({settings.method.name}) to ONNX opset {opset} ...")
    traced = trace(adapter, settings, traced_path, opset)
    onnx.checker.check_model(traced, full_check=True)
    problems = tensorrt_problems(traced)
    if problems:
        raise RuntimeError("the exported graph has ops TensorRT does not import: " + "; ".join(problems))
    log(f"      traced in {time.time() - started:.1f}s: {len(traced.graph.node)} nodes, onnx.checker clean, TensorRT-importable ops only")

    validation = None
    if run_validation:
        started = time.time()
        log(f"[2/3] validating in ONNX Runtime (CPU) against PyTorch ({dtype}) on {len(VALIDATION_INPUTS)} input batches ...")
        validation = validate(adapter, settings, traced_path, seed=seed, dtype=dtype)
        log(
            f"      merge decisions right up to near-ties {validation['merge_agreement']:.4f} "
            f"(identical {validation['merge_agreement_raw']:.4f}, {validation['near_ties_excused']} near-tie tokens excused); "
            f"with the same decisions: max abs error {validation['max_abs_error']:.2e} (relative {validation['max_rel_error']:.1e}), "
            f"cosine {validation['cosine_min']:.6f}; free-running outputs: cosine {validation['free_running_cosine_min']:.6f}, "
            f"relative error {validation['free_running_max_rel_error']:.1e} ({time.time() - started:.1f}s)"
        )
        if not validation["passed"]:
            raise UsageError(f"validation failed: {'; '.join(validation['failures'])}; nothing written")
    else:
        log("[2/3] validation skipped (--no-validate)")
    shipped = strip_slots(traced)
    return shipped, manifest(adapter, settings, report, shipped, opset, dtype, validation, extra)


def export_onnx(
    adapter: Adapter,
    settings: MergeSettings,
    report: BudgetReport,
    output: Path,
    *,
    opset: int = DEFAULT_OPSET,
    run_validation: bool = True,
    dtype: str = "fp32",
    seed: int | None = None,
    extra: dict | None = None,
    log=print,
) -> dict:
    """Write `output` (.onnx) and its manifest (.json beside it); return the manifest."""
    check_request(adapter, output, opset, dtype)
    manifest_path = output.with_suffix(".json")
    with tempfile.TemporaryDirectory(prefix="tokenfuse-") as work, atomic_outputs(output, manifest_path) as (tmp_onnx, tmp_json):
        shipped, result = build_graph(adapter, settings, report, Path(work), opset=opset, dtype=dtype, run_validation=run_validation,
                                      seed=seed, extra=extra or {}, log=log)
        log(f"[3/3] writing {output} and {manifest_path.name}")
        onnx.save(shipped, str(tmp_onnx))
        tmp_json.write_text(json.dumps(result, indent=2) + "\n")
    return result


class _Plain(torch.nn.Module):
    """An unmerged text encoder as it is exported and served today: the framework's own forward at
    whatever length the batch has, then the model's pooling."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        self.model, self.pooling = adapter.model, adapter.pooling

    def forward(self, input_ids, attention_mask):
        from .encoder import TokenState

        x = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        state = TokenState.start(x, valid=attention_mask > 0, mask=attention_mask)
        # the merged graphs' outputs too: every real token its own, of size 1
        return self.pooling(x, state), x, (state.size * state.valid.unsqueeze(-1)), state.valid.to(torch.int64)


def natural_length_graph(adapter: Adapter, work: Path, *, opset: int, dtype: str, log, longest: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """The unmerged text model as users export it today (sentence-transformers, optimum and TEI):
    dynamic batch and sequence axes, each batch padded to its longest text. Checked against the
    PyTorch model at lengths other than the traced one, `longest` (the longest text it will run)
    among them; returns the graph and its manifest."""
    if not adapter.is_text or adapter.pooling is None:
        raise UsageError(f"{adapter.name}: the natural-length export is for text encoders with a pooled embedding")
    names = ["input_ids", "attention_mask"]
    plain = _Plain(adapter).eval()
    example = adapter.with_seq_len(16).natural_inputs(2, torch.Generator().manual_seed(0))
    traced = Path(work, "natural.onnx")
    log(f"exporting unmerged {adapter.name} with dynamic batch and sequence axes ...")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (example["input_ids"], example["attention_mask"]), str(traced), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["embedding", *TOKEN_OUTPUTS],
                          dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names + list(TOKEN_OUTPUTS)} | {"embedding": {0: "batch"}})
    model = onnx.load(str(traced))
    shapes, validation = _check_plain(adapter, plain, traced, dtype, longest)
    for value in model.graph.output:  # the tracer leaves feature sizes symbolic (e.g. "Divembedding_dim_1")
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            if dim.dim_param not in ("batch", "sequence"):
                dim.dim_value = size
    return model, {
        "schema_version": SCHEMA_VERSION, "tokenfuse_version": __version__, "model": adapter.name, "family": adapter.family, "method": "none",
        "natural_length": True, "validation": validation, "budget": {"flops_ratio": 1.0}, "preprocess": {**adapter.preprocess(), "seq_len": adapter.max_seq_len},
        "pooling": adapter.pooling.to_json(), "opset": opset, "dtype": dtype, **io_spec(model),
        "exported_with": {"torch": torch.__version__, "onnx": onnx.__version__, "python": platform.python_version()},
    }


def _check_plain(adapter: Adapter, plain: torch.nn.Module, path: Path, dtype: str, longest: int | None):
    """The dynamic-length graph against PyTorch at lengths other than the traced one (and at
    `longest`); returns the shapes of its outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    limit = TOLERANCES[dtype]["cosine_min"]
    lengths, worst = sorted({7, min(61, adapter.length_limit), min(longest or 7, adapter.length_limit)}), 1.0
    for length in lengths:
        inputs = adapter.with_seq_len(length).natural_inputs(3, torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = plain(inputs["input_ids"], inputs["attention_mask"])[0].float().numpy()
        outputs = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        got = outputs[0].astype(np.float32)
        cosine = (expected * got).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
        if cosine.min() < limit:
            raise RuntimeError(f"the dynamic-length export differs from PyTorch at length {length} (cosine {cosine.min():.6f})")
        worst = min(worst, float(cosine.min()))
    validation = {"passed": True, "lengths": lengths, "embedding_cosine_min": worst, "cosine_limit": limit}
    return {value.name: array.shape for value, array in zip(session.get_outputs(), outputs)}, validation
