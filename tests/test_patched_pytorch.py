"""Patched models as PyTorch users run them: fused attention (SDPA) and torch.compile.

* `attention="fused"` (the default on GPUs) computes what the explicit MatMul-Softmax-MatMul does,
  with padding, causal masks, proportional attention and every method; exports stay explicit.
* torch.compile(fullgraph=True): one graph, no breaks, no recompiles for new inputs of the same
  shape (other values, another padding pattern), and the eager patched model's outputs. Dynamo's
  tracing decides graph breaks and recompiles, so the "eager" backend checks both without a C++
  compiler; the GPU benchmark (tokenfuse.engines.torch_bench) compiles with inductor.
"""

from __future__ import annotations

import copy
import json

import onnx
import pytest
import torch

from tokenfuse.exporter import UsageError, export, patch

METHODS = ["tome", "pitome", "crossget", "turbo"]
SEQ_LEN = 24


def _vision():
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def _bert():
    import transformers as tf

    config = tf.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=500,
                           attn_implementation="eager")
    return tf.BertModel(config)


def _clip_text():
    import transformers as tf

    config = tf.CLIPTextConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, projection_dim=16,
                               max_position_embeddings=SEQ_LEN)
    return tf.CLIPTextModelWithProjection(config)


def _image_inputs(seed: int) -> dict:
    return {"x": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def _text_inputs(seed: int, eos: int | None = None) -> dict:
    """Random ids with a different padded length per seed; with `eos`, each row's last kept
    position and its padding are EOS, as CLIP's tokenizer writes them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (2, SEQ_LEN), generator=gen)
    lengths = torch.tensor([[SEQ_LEN], [SEQ_LEN - 3 - seed]])
    positions = torch.arange(SEQ_LEN)
    if eos is not None:
        ids = torch.where(positions >= lengths - 1, eos, ids)
    return {"input_ids": ids, "attention_mask": (positions < lengths).long()}


def _clip_inputs(seed: int) -> dict:
    import transformers as tf

    return _text_inputs(seed, eos=tf.CLIPTextConfig().eos_token_id)


FAMILIES = {"timm-vit": (_vision, _image_inputs), "bert": (_bert, _text_inputs), "clip-text": (_clip_text, _clip_inputs)}


def _first_tensor(result) -> torch.Tensor:
    if isinstance(result, torch.Tensor):
        return result
    return next(iter(result.values())) if isinstance(result, dict) else result[0]


# The default run traces every method on the ViT and each text family with two methods; the other
# pairs (the same merge code on other models) are slow, so CI runs them all.
DEFAULT_COMPILES = {("timm-vit", m) for m in METHODS} | {("bert", "pitome"), ("bert", "turbo"), ("clip-text", "tome"), ("clip-text", "crossget")}
COMPILES = [pytest.param(family, method, marks=() if (family, method) in DEFAULT_COMPILES else pytest.mark.slow)
            for family in FAMILIES for method in METHODS]


@pytest.mark.parametrize(("family", "method"), COMPILES)
def test_patched_model_compiles_to_one_graph_without_recompiles(family, method):
    build, make_inputs = FAMILIES[family]
    torch.manual_seed(0)
    model = patch(build().eval(), method=method, r=0.8, turbo_threshold=0)  # turbo merges short inputs too
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # a graph break raises
    with torch.no_grad():
        first = compiled(**make_inputs(1))
        with torch.compiler.set_stance("fail_on_recompile"):
            second = compiled(**make_inputs(2))
        eager = model(**make_inputs(2))
    assert torch.isfinite(_first_tensor(first)).all()
    torch.testing.assert_close(_first_tensor(second), _first_tensor(eager), rtol=0, atol=0)


def test_a_recompile_would_fail_the_check():
    """The stance above refuses a recompile: a new batch size is one."""
    model = patch(_vision().eval(), method="tome", r=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(2, 3, 32, 32))
        with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError, match="recompil"):
            compiled(torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_attention_computes_the_explicit_attention(family, method):
    build, make_inputs = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    explicit, fused = (patch(copy.deepcopy(model), method=method, r=0.8, turbo_threshold=0, attention=attention)
                       for attention in ("explicit", "fused"))
    with torch.no_grad():
        want, got = explicit(**make_inputs(3)), fused(**make_inputs(3))
    torch.testing.assert_close(_first_tensor(got), _first_tensor(want), rtol=1e-5, atol=1e-5)


def test_fused_attention_compiles_to_one_graph():
    model = patch(_clip_text().eval(), method="pitome", r=0.8, attention="fused")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(_first_tensor(compiled(**_clip_inputs(1))), _first_tensor(model(**_clip_inputs(1))), rtol=0, atol=0)


def test_an_unknown_attention_is_refused():
    with pytest.raises(UsageError, match="attention='flash'.*auto, explicit, fused"):
        patch(_vision().eval(), method="tome", r=2, attention="flash")(torch.randn(1, 3, 32, 32))


def test_exports_write_explicit_attention_whatever_is_asked(hf_dirs, tmp_path):
    """The ONNX graph holds one Softmax per layer (the pattern TensorRT fuses), also when the
    options ask for fused attention."""
    export(f"hf:{hf_dirs['vit']}", tmp_path / "m.onnx", method="tome", r=2, attention="fused", log=lambda *_: None)
    graph = onnx.load(tmp_path / "m.onnx").graph
    layers = len(json.loads((tmp_path / "m.json").read_text())["schedule"])
    assert sum(node.op_type == "Softmax" for node in graph.node) == layers


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_small_models():
    """tokenfuse.engines.torch_bench (made for a GPU) on a CPU, small models, the trace-only backend:
    every variant is timed, compiled outputs equal eager ones, none equals the original model."""
    from tokenfuse.engines import torch_bench

    options = torch_bench.Options(backend="eager", rounds=3, max_seconds=5.0, warmup=1, input_sets=2, tiny=True)
    report = torch_bench.bench(["vit-b", "minilm"], ["eager", "compile"], [2], "fp32", torch.device("cpu"), options)
    assert [m["name"] for m in report["models"]] == ["vit-b", "minilm"]
    for model in report["models"]:
        assert {row["mode"] for row in model["rows"]} == {"eager", "compile"}
        for row in model["rows"]:
            assert set(row["timings"]) == {"original", "explicit", "none", "pitome", "tome"}
            assert all(t["p50_ms"] > 0 and t["runs"] >= 3 for t in row["timings"].values())
            assert all(check["error_vs_eager"] == 0 for check in row["checks"].values())
            assert row["output_error_none_vs_original"] < 1e-5 and row["recompiled_while_timing"] is None
        assert model["budgets"]["pitome"]["flops_ratio"] < 1
    assert "| compile | 2 |" in torch_bench.markdown(report)
