"""The whole merged forward against the independent NumPy reference (tests/reference.py), for every
family the adapters support and every method: `adapter.run`, `patch` and the exported ONNX.

The reference gets the libraries' own embeddings and the models' weights as NumPy arrays; the
blocks, the merges (decisions and weights), proportional attention, padding, the frozen EOS and
the heads are its own. Inputs on which a decision is closer than float32 rounding are redrawn
(seeded), so a failure is a real difference. `none` against the libraries' own forward checks the
reference's blocks and heads; planted faults (the sign of log(size), an unweighted merge) show
the comparison fails when the production forward is wrong.
"""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch

import reference
from gates import assert_validated_exactly
from tokenfuse.engines.build import compile_engine
from tokenfuse.exporter import export, patch
from tokenfuse.exporter import encoder as encoder_module
from tokenfuse.exporter.adapters import adapter_for
from tokenfuse.exporter.adapters.bert import Bert
from tokenfuse.exporter.adapters.clip import ClipText
from tokenfuse.exporter.methods import TokenMerge
from tokenfuse.exporter.settings import MergeOptions

METHODS = ["tome", "pitome", "crossget", "turbo"]
FAMILIES = ["timm-vit", "timm-distilled", "timm-registers", "timm-avg-pool", "hf-vit", "hf-vit-cls",
            "clip-vision", "clip-text", "bert"]
SEQ_LEN = 16
GAP = 1e-5  # decisions closer than this are left to float32 rounding: redraw
TOLERANCE = 1e-4  # max abs error relative to max(1, the output's largest value)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _norm(module):
    return (_np(module.weight), _np(module.bias), module.eps)


def _layer(q, k, v, o, fc1, fc2, ln1, ln2, heads, act, post_norm=False):
    layer = {"heads": heads, "act": act, "post_norm": post_norm, "ln1": _norm(ln1), "ln2": _norm(ln2)}
    for name, lin in (("q", q), ("k", k), ("v", v), ("o", o), ("fc1", fc1), ("fc2", fc2)):
        layer[f"{name}_w"], layer[f"{name}_b"] = _np(lin.weight), _np(lin.bias)
    return layer


def _timm_layer(block):
    attn, c = block.attn, block.attn.proj.in_features
    w, b = _np(attn.qkv.weight), _np(attn.qkv.bias)
    layer = _layer(attn.qkv, attn.qkv, attn.qkv, attn.proj, block.mlp.fc1, block.mlp.fc2, block.norm1, block.norm2, attn.num_heads, "gelu")
    for i, name in enumerate("qkv"):
        layer[f"{name}_w"], layer[f"{name}_b"] = w[i * c:(i + 1) * c], b[i * c:(i + 1) * c]
    return layer


def _apply(module, x):
    """An nn.Identity, LayerNorm or Linear head piece, in NumPy."""
    if isinstance(module, torch.nn.Identity):
        return x
    if isinstance(module, torch.nn.LayerNorm):
        return reference.layer_norm(x, _norm(module))
    bias = _np(module.bias) if module.bias is not None else 0.0
    return reference.linear(x, _np(module.weight), bias)


class Family:
    """A small random model of one family, its reference description and inputs."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.name = name
        self.model = _build(name).eval()
        self.adapter = _adapter(name, self.model)

    def inputs(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if self.name == "bert":
            ids = torch.randint(1, 500, (3, SEQ_LEN), generator=g)
            lengths = torch.tensor([[SEQ_LEN], [11], [6]])
            mask = (torch.arange(SEQ_LEN) < lengths).long()
            return {"input_ids": ids * mask, "attention_mask": mask}
        if self.name == "clip-text":
            eos = self.model.config.eos_token_id
            ids = torch.randint(1, 400, (3, SEQ_LEN), generator=g)
            lengths = torch.tensor([[SEQ_LEN], [12], [7]])
            ids = torch.where(torch.arange(SEQ_LEN) >= lengths - 1, eos, ids)  # EOS, then EOS as padding
            return {"input_ids": ids, "attention_mask": (torch.arange(SEQ_LEN) < lengths).long()}
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}

    def embed(self, inputs):
        """The library's own embedding; masks, causal positions and the frozen EOS as NumPy."""
        m, extra = self.model, {}
        with torch.no_grad():
            if self.name.startswith("timm"):
                x = m.norm_pre(m._pos_embed(m.patch_embed(inputs["pixel_values"])))
            elif self.name.startswith("hf-vit"):
                x = (m.vit if self.name == "hf-vit-cls" else m).embeddings(inputs["pixel_values"])
            elif self.name == "clip-vision":
                x = m.vision_model.pre_layrnorm(m.vision_model.embeddings(inputs["pixel_values"]))
            elif self.name == "clip-text":
                ids = inputs["input_ids"]
                x = m.text_model.embeddings(input_ids=ids)
                eos = (ids == m.config.eos_token_id).int().argmax(-1).numpy()
                extra = dict(valid=inputs["attention_mask"].numpy() > 0,
                             positions=np.broadcast_to(np.arange(ids.shape[1], dtype=np.float64), ids.shape).copy(),
                             frozen=np.arange(ids.shape[1]) == eos[:, None])
            else:
                ids = inputs["input_ids"]
                x = m.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
                extra = dict(valid=inputs["attention_mask"].numpy() > 0)
        return _np(x), extra

    def layers(self):
        m = self.model
        if self.name.startswith("timm"):
            return [_timm_layer(b) for b in m.blocks]
        if self.name.startswith("hf-vit"):
            vit = m.vit if self.name == "hf-vit-cls" else m
            return [_layer(l.attention.q_proj, l.attention.k_proj, l.attention.v_proj, l.attention.o_proj, l.mlp.fc1, l.mlp.fc2,
                           l.layernorm_before, l.layernorm_after, vit.config.num_attention_heads, vit.config.hidden_act) for l in vit.layers]
        if self.name.startswith("clip"):
            tower = m.vision_model if self.name == "clip-vision" else m.text_model
            return [_layer(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.out_proj, l.mlp.fc1, l.mlp.fc2,
                           l.layer_norm1, l.layer_norm2, tower.config.num_attention_heads, tower.config.hidden_act) for l in tower.encoder.layers]
        return [_layer(l.attention.self.query, l.attention.self.key, l.attention.self.value, l.attention.output.dense,
                       l.intermediate.dense, l.output.dense, l.attention.output.LayerNorm, l.output.LayerNorm,
                       m.config.num_attention_heads, m.config.hidden_act, post_norm=True) for l in m.encoder.layer]

    def head(self, out) -> dict[str, np.ndarray]:
        """The family's outputs from the final tokens, in the adapter's output names."""
        m, x, size = self.model, out["x"], out["size"]
        if self.name.startswith("timm"):
            x = _apply(m.norm, x)
            p = m.num_prefix_tokens
            if self.name == "timm-distilled":
                pooled = (_apply(m.head, x[:, 0]) + _apply(m.head_dist, x[:, 1])) / 2
            elif m.global_pool == "avg":
                pooled = _apply(m.head, _apply(m.fc_norm, reference.weighted_mean(x[:, p:], size[:, p:])))
            else:
                pooled = _apply(m.head, _apply(m.fc_norm, x[:, 0]))
            return {"logits": pooled, "last_hidden_state": x, "token_sizes": size}
        if self.name.startswith("hf-vit"):
            vit = m.vit if self.name == "hf-vit-cls" else m
            x = _apply(vit.layernorm, x)
            if self.name == "hf-vit-cls":
                return {"logits": _apply(m.classifier, x[:, 0]), "last_hidden_state": x, "token_sizes": size}
            return {"pooler_output": np.tanh(_apply(vit.pooler.dense, x[:, 0])), "last_hidden_state": x, "token_sizes": size}
        if self.name == "clip-vision":
            pooled = _apply(m.vision_model.post_layernorm, x[:, 0])
            return {"pooler_output": pooled, "image_embeds": _apply(m.visual_projection, pooled), "last_hidden_state": x, "token_sizes": size}
        valid = out["valid"]
        if self.name == "clip-text":
            x = _apply(m.text_model.final_layer_norm, x)
            pooled = x[out["frozen"]]
            return {"pooler_output": pooled, "text_embeds": _apply(m.text_projection, pooled), "last_hidden_state": x,
                    "token_sizes": size, "token_mask": valid}
        return {"embedding": reference.weighted_mean(x, size, valid), "last_hidden_state": x, "token_sizes": size, "token_mask": valid}

    def reference(self, settings, inputs):
        x, extra = self.embed(inputs)
        cfg = settings.method
        knobs = {k: v for k, v in cfg.knobs.items() if k != "turbo_threshold"}  # the threshold is in the schedule
        out = reference.reference_encoder(x, self.layers(), settings.schedule, method=cfg.name, protected=settings.protected,
                                          prop_attn=settings.prop_attn, metric=settings.metric, **extra, **knobs)
        return self.head(out), out


def _build(name):
    if name.startswith("timm"):
        import timm

        small = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)
        variants = {"timm-vit": ("vit_tiny_patch16_224", {}), "timm-distilled": ("deit_tiny_distilled_patch16_224", {}),
                    "timm-registers": ("vit_tiny_patch16_224", {"reg_tokens": 2}),
                    "timm-avg-pool": ("vit_tiny_patch16_224", {"global_pool": "avg", "class_token": False})}
        arch, options = variants[name]
        return timm.create_model(arch, **small, **options)
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    image = dict(small, image_size=32, patch_size=8)
    if name == "hf-vit":
        return tf.ViTModel(tf.ViTConfig(**image))
    if name == "hf-vit-cls":
        return tf.ViTForImageClassification(tf.ViTConfig(**image, num_labels=5))
    if name == "clip-vision":
        return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**image, projection_dim=16))
    if name == "clip-text":
        return tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**small, projection_dim=16, max_position_embeddings=SEQ_LEN))
    return tf.BertModel(tf.BertConfig(**small, vocab_size=500, attn_implementation="eager"))


def _adapter(name, model):
    if name == "bert":
        return Bert(model, "BertModel", seq_len=SEQ_LEN)
    if name == "clip-text":
        return ClipText(model, "CLIPTextModelWithProjection", seq_len=SEQ_LEN)
    return adapter_for(model)


@pytest.fixture(scope="module")
def families():
    """Built on first use: each family once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Family(name)
        return cache[name]

    return get


def _settings(family, method):
    settings, _ = MergeOptions(method=method, r=0.75, turbo_threshold=0).resolve(family.adapter)
    return settings


def _well_separated(family, settings, seed=0):
    """Seeded inputs on which every decision of the reference has a margin above GAP."""
    for attempt in range(20):
        inputs = family.inputs(seed * 100 + attempt)
        expected, info = family.reference(settings, inputs)
        if info["min_gap"] > GAP and not info["inexact_tie"]:
            return inputs, expected
    raise AssertionError(f"no well-separated input for {family.name}")


def assert_matches(expected: dict, got: dict, what: str):
    """Every output the reference describes, real tokens only where there is a mask."""
    keep = expected.get("token_mask")
    if keep is not None:
        assert np.array_equal(np.asarray(got["token_mask"]) > 0, keep), f"{what}: token_mask"
    for name, want in expected.items():
        if name == "token_mask":
            continue
        have = np.asarray(got[name], dtype=np.float64)
        assert have.shape == want.shape, (what, name, have.shape, want.shape)
        if keep is not None and want.ndim == 3:
            have, want = have * keep[..., None], want * keep[..., None]
        error = np.abs(have - want).max() / max(1.0, np.abs(want).max())
        assert error <= TOLERANCE, f"{what}: {name} differs from the reference by {error:.2e}"


def _run(family, settings, inputs):
    with torch.no_grad():
        outputs, state = family.adapter.run(settings, inputs)
    return {k: v.numpy() for k, v in outputs.items()}, state


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_without_merging_is_the_original_model(families, name):
    """Checks the reference itself (blocks, heads, masks) against the libraries' own forward."""
    family = families(name)
    settings = _settings(family, "none")
    inputs = family.inputs(7)
    expected, _ = family.reference(settings, inputs)
    m = family.model
    with torch.no_grad():
        if name.startswith("timm"):
            original = {"logits": m(inputs["pixel_values"])}
        elif name == "hf-vit":
            original = {"pooler_output": m(**inputs).pooler_output}
        elif name == "hf-vit-cls":
            original = {"logits": m(**inputs).logits}
        elif name == "clip-vision":
            original = {"image_embeds": m(**inputs).image_embeds}
        elif name == "clip-text":
            original = {"text_embeds": m(**inputs).text_embeds}
        else:
            hidden = m(**inputs).last_hidden_state
            original = {"last_hidden_state": hidden * inputs["attention_mask"][..., None]}
    for key, value in original.items():
        want = expected[key] * (expected["token_mask"][..., None] if key == "last_hidden_state" else 1)
        assert np.abs(_np(value) - want).max() <= 1e-5, key


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_adapter_run_and_patch_match_the_reference(families, name, method):
    family = families(name)
    settings = _settings(family, method)
    # both layers merge, so merged sizes reach the second layer's attention and merge
    assert family.adapter.shape().tokens > settings.schedule[0] > settings.schedule[1]
    inputs, expected = _well_separated(family, settings)
    got, state = _run(family, settings, inputs)
    assert len(state.slots) == 2
    assert_matches(expected, got, f"{name} {method} adapter.run")

    patched = patch(copy.deepcopy(family.model), method=method, r=0.75, turbo_threshold=0)
    with torch.no_grad():
        result = patched(**inputs)
    primary = next(iter(expected))
    if name.startswith("timm"):
        result = {primary: result}
    assert_matches({primary: expected[primary]}, {primary: _np(result[primary])}, f"{name} {method} patch")


# TensorRT-RTX builds: every method for the text families (padding, causal positions and the frozen
# EOS change the merge's ops per method), one method per vision family (every method is built on
# ViT-B/16 and MiniLM in test_export, under --slow).
ENGINE_BUILDS = {("bert", m) for m in METHODS} | {("clip-text", m) for m in METHODS} | {
    ("timm-vit", "tome"), ("timm-distilled", "pitome"), ("timm-registers", "crossget"), ("timm-avg-pool", "turbo"),
    ("hf-vit", "pitome"), ("hf-vit-cls", "turbo"), ("clip-vision", "crossget")}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_exported_onnx_matches_the_reference(families, name, method, tmp_path):
    """The real export path (validation included, at the measured level) and the shipped file."""
    family = families(name)
    settings = _settings(family, method)
    inputs, expected = _well_separated(family, settings, seed=1)
    path = tmp_path / "m.onnx"
    manifest = export(family.adapter, path, method=method, r=0.75, turbo_threshold=0, seed=0, log=lambda *_: None)
    assert_validated_exactly(manifest, max_abs_error=1e-5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})))
    assert_matches(expected, got, f"{name} {method} ONNX")
    if (name, method) in ENGINE_BUILDS:
        assert compile_engine(path, batch=(1, 2, 2), log=lambda *_: None)[0]


def _flipped_log_size_bias(monkeypatch):
    original = encoder_module.attention_bias

    def flipped(state, prop_attn):
        bias = original(state, prop_attn)
        if prop_attn and state.merged:
            bias = bias - 2 * state.size[..., 0].log()[:, None, None, :]
        return bias

    monkeypatch.setattr(encoder_module, "attention_bias", flipped)


def _unweighted_merge(monkeypatch):
    merge, merge_padded = TokenMerge.merge, TokenMerge.merge_padded

    def plain_mean(self, x, size):
        out, _ = merge(self, x, torch.ones_like(size))
        return out, merge(self, x, size)[1]

    def plain_mean_padded(self, x, size, valid):
        out, _, _ = merge_padded(self, x, torch.ones_like(size), valid)
        return (out, *merge_padded(self, x, size, valid)[1:])

    monkeypatch.setattr(TokenMerge, "merge", plain_mean)
    monkeypatch.setattr(TokenMerge, "merge_padded", plain_mean_padded)


@pytest.mark.parametrize("fault", [_flipped_log_size_bias, _unweighted_merge], ids=["log-size-sign", "unweighted-merge"])
@pytest.mark.parametrize("name", ["timm-vit", "hf-vit", "clip-vision", "clip-text", "bert"])
def test_planted_faults_fail_the_comparison(families, name, fault, monkeypatch):
    """The test of the tests: a wrong production forward does not match the reference."""
    family = families(name)
    settings = _settings(family, "tome")
    inputs, expected = _well_separated(family, settings)
    assert_matches(expected, _run(family, settings, inputs)[0], "unplanted")
    fault(monkeypatch)
    with pytest.raises(AssertionError, match="differs from the reference|token_mask"):
        assert_matches(expected, _run(family, settings, inputs)[0], f"{name} with {fault.__name__}")
