"""End to end on the reference models: timm ViT (random init) and all-MiniLM-L6-v2 (real weights).

For every method: the exported ONNX agrees with the merged PyTorch model (fp32, <= 1e-4 max abs
error on fresh inputs, the merge decisions agreeing exactly as measured with the fixed seeds),
holds only TensorRT-importable ops, and builds into a TensorRT-RTX engine on this CPU-only
machine. Every method runs on ViT-Ti/16, which has ViT-B/16's 12 layers, 197 tokens and merge
schedule at a quarter of the width, and on MiniLM. ViT-B/16 itself runs PiToMe (the README's
headline export). Marked `slow` (tens of seconds each; `--slow` and CI run them): ViT-B's other
methods, and the engine builds of ViT-B and MiniLM (test_reference_forward builds every merge
method on small BERT, CLIP-text and vision models; test_families one method per family, in turn). `none` equals the original, unpatched model. The
exports are conftest's shared ones (one per model and method per session)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gates import assert_validated_exactly
from tokenfuse.engines.build import compile_engine
from tokenfuse.exporter import export
from tokenfuse.exporter.agreement import judge
from tokenfuse.exporter.onnx_export import TOLERANCES
from tokenfuse.exporter.settings import MergeOptions

METHODS = ["none", "tome", "pitome", "crossget", "turbo"]


def group(model: str, method: str):
    """pytest-xdist (--dist loadgroup) keeps the tests of one export on one worker, which makes it
    once: ViT-B per method (its five exports and builds in one group would hold one worker for
    minutes); ViT-Ti with the engine tests that share its exports; MiniLM as a whole."""
    return pytest.mark.xdist_group(f"vit-b-{method}" if model == "vit-b" else model)


def cases(models):
    """(model, method) params with ids as "pitome-vit-b"; ViT-B's are slow but for the headline's pitome."""
    return [pytest.param(model, method, marks=[group(model, method), *([pytest.mark.slow] if model == "vit-b" and method != "pitome" else [])],
                         id=f"{method}-{model}")
            for model in models for method in METHODS]


def _session(model):
    """An ONNX Runtime session of a path, or of a loaded model (serialized in memory)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # conftest shares the cores between pytest-xdist workers
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _with_slot_outputs(path) -> onnx.ModelProto:
    """The shipped graph with each layer's slot tensor (merge_slots.i, kept inside it) as an output."""
    graph = onnx.load(str(path))
    names = sorted({o for n in graph.graph.node for o in n.output if o.startswith("merge_slots.")}, key=lambda n: int(n.split(".")[1]))
    graph.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, None) for n in names)
    return graph


def _ort_outputs(session, inputs):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})))


@pytest.mark.parametrize("model, method", cases(("vit-ti", "vit-b", "minilm")))
def test_onnx_matches_merged_pytorch(shared_exports, model, method):
    """Same decisions, same numbers: <= 1e-4 max abs error; decisions differ only at near-ties.

    The shipped file keeps each layer's slot tensor (named merge_slots.i) inside the graph; the
    shipped graph with those listed as outputs (built in memory) gives ONNX Runtime's decisions,
    which PyTorch replays while still making its own: every one must be right up to near-ties
    (agreement.judge at the fp32 validation tolerance; which side of a near-tie a CPU lands on
    varies between hosts, so raw agreement is not pinned). The shipped file itself must give the
    same outputs bit for bit.
    """
    adapter = shared_exports.adapter(model)
    path, manifest = shared_exports.get(model, method)
    settings, _ = MergeOptions(method=method, r=0.9).resolve(adapter)
    shipped_session, session = _session(path), _session(_with_slot_outputs(path))
    for batch, seed in ((1, 101), (2, 202)):  # fresh inputs, not the export's own validation inputs (batches 1 and 3)
        inputs = adapter.random_inputs(batch, torch.Generator().manual_seed(seed))
        got = _ort_outputs(session, inputs)
        shipped = _ort_outputs(shipped_session, inputs)
        slots = [torch.from_numpy(v) for k, v in got.items() if k.startswith("merge_slots.")]
        with torch.no_grad():
            free, _ = adapter.run(settings, inputs)
            replayed, state = adapter.run(settings, inputs, replay=slots)
        assert list(shipped) == [k for k in got if not k.startswith("merge_slots.")] == list(free)
        judged = [judge(decision, theirs, TOLERANCES["fp32"]["near_tie"]) for decision, theirs in zip(state.decisions, slots)]
        assert len(judged) == len(slots) and all(j.wrong == 0 for j in judged), judged
        for name in free:
            assert got[name].shape == tuple(free[name].shape)
            assert np.abs(shipped[name] - got[name]).max() == 0.0
            assert np.abs(got[name] - replayed[name].numpy()).max() <= 1e-4, (name, batch)
            assert np.abs(got[name] - free[name].numpy()).max() <= 1e-4, (name, batch)
    assert_validated_exactly(manifest)  # the export's own validation, seed 0


@pytest.mark.parametrize("model, method", cases(("vit-ti", "vit-b", "minilm")))
def test_graph_is_tensorrt_ready(shared_exports, model, method):
    path, _ = shared_exports.get(model, method)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"Sort", "TopK", "ScatterND", "ScatterElements", "If", "Loop"}, ops
    for value in graph.graph.input:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.slow  # 7-45 s each; the default run builds every merge method on small BERT, CLIP-text and vision models
@pytest.mark.parametrize("model, method", cases(("vit-b", "minilm")))
def test_builds_with_tensorrt_rtx(shared_exports, model, method):
    path, _ = shared_exports.get(model, method)
    engine, _ = compile_engine(path, batch=(1, 2, 4), log=lambda *_: None)
    assert len(engine) > 1_000_000


@group("vit-b", "pitome")
def test_manifest_is_the_contract(shared_exports):
    path, manifest = shared_exports.get("vit-b", "pitome")
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["model"] == "timm:vit_base_patch16_224" and on_disk["method"] == "pitome"
    assert on_disk["schedule"][-1] == 60
    assert len(onnx.load(str(path)).graph.node) == 1061  # docs/cli.md (and its count with --lowering plugin)
    assert on_disk["budget"]["flops_ratio"] == pytest.approx(0.565, abs=0.001)
    assert on_disk["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    assert [o["name"] for o in on_disk["outputs"]] == ["logits", "last_hidden_state", "token_sizes"]
    assert on_disk["outputs"][1]["shape"] == ["batch", 60, 768]
    assert on_disk["opset"] >= 17 and on_disk["tokenfuse_version"]
    assert set(on_disk["validation"]["cases"]) == {"random-1", "random-3", "natural-3"}
    for key in ("margin", "alpha", "proportional_attention", "protected_tokens", "metric"):
        assert key in on_disk["settings"]
    assert on_disk["preprocess"]["kind"] == "image" and on_disk["preprocess"]["size"] == [224, 224]
    assert len(on_disk["preprocess"]["mean"]) == 3


@group("minilm", "pitome")
def test_text_manifest_names_its_tokenizer_and_mask_inputs(shared_exports, minilm_path):
    _, manifest = shared_exports.get("minilm", "pitome")
    assert manifest["preprocess"] == {"kind": "text", "tokenizer": minilm_path, "seq_len": 128}
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["settings"]["pitome_variant"] == "text" and manifest["settings"]["seq_len"] == 128


@group("vit-ti", "none")
def test_none_equals_the_original_vit(shared_exports):
    path, _ = shared_exports.get("vit-ti", "none")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        original = shared_exports.adapter("vit-ti").model(pixels).numpy()
    assert np.abs(_ort_outputs(_session(path), {"pixel_values": pixels})["logits"] - original).max() <= 1e-5


@group("minilm", "none")
def test_none_equals_the_original_minilm(shared_exports):
    path, _ = shared_exports.get("minilm", "none")
    inputs = shared_exports.adapter("minilm").random_inputs(3, torch.Generator().manual_seed(6))
    with torch.no_grad():
        original = shared_exports.adapter("minilm").model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    got = _ort_outputs(_session(path), inputs)
    assert np.abs((got["last_hidden_state"] - original.numpy()) * mask.numpy()).max() <= 1e-5
    pooled = (original * mask).sum(1) / mask.sum(1)  # the directory's sentence-transformers mean pooling,
    pooled = pooled / pooled.norm(dim=-1, keepdim=True)  # then its Normalize module
    assert np.abs(got["embedding"] - pooled.numpy()).max() <= 1e-5


@pytest.mark.slow
def test_fp16_export_validates_keeps_fp32_io_and_builds(tmp_path):
    """fp16 computes in half precision but keeps similarity, energy, softmax sums and sizes in
    fp32; inputs and outputs stay fp32. TensorRT's strongly typed build takes the graph's types."""
    path = tmp_path / "vit16.onnx"
    manifest = export("timm:vit_base_patch16_224", path, random_init=True, method="pitome", r=0.9, dtype="fp16", seed=3, log=lambda *_: None)
    validation = manifest["validation"]
    assert manifest["dtype"] == "fp16" and validation["passed"], validation
    # half precision flips many near-ties (raw agreement below 1), which the gate excuses
    assert validation["merge_agreement_raw"] < 1.0 and validation["near_ties_excused"] > 0, validation
    assert validation["max_rel_error"] <= 5e-3, validation
    assert validation["cosine_min"] >= 0.99999, validation
    assert {o["dtype"] for o in manifest["inputs"] + manifest["outputs"]} == {"float32"}
    graph = onnx.load(str(path))
    weights = [i for i in graph.graph.initializer if len(i.dims) == 2 and min(i.dims) >= 768]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    # a fixed batch of 1 (13 s against 23 s for 1:2:2): dynamic-batch builds are checked in fp32 above
    assert compile_engine(path, batch=(1, 1, 1), log=lambda *_: None)[0]
