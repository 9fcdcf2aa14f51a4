"""Validation that holds on real weights.

- Near-tie-aware merge agreement (exporter.agreement): decisions that differ from the reference only
  at near-ties are excused; a wrong decision rule is caught. Checked against the independent float64
  reference (tests/reference.py), on anisotropic metrics with planted exact and near ties.
- Exports of models with trained-like statistics (anisotropic keys, repeated words, identical
  padding) validate under every seed; a planted wrong rule in the exported graph fails validation.
- Validation inputs with real inputs' statistics (tokenizer-framed text, photograph-like pixels).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import reference_plan
from trained_like import trained_like
from tokenfuse.exporter import export, load_model, methods, onnx_export
from tokenfuse.exporter.adapters import adapter_for
from tokenfuse.exporter.agreement import Decision, judge
from tokenfuse.exporter.errors import UsageError
from tokenfuse.exporter.methods import LayerRule, match_step, max_removable
from tokenfuse.exporter.plugin_lowering import kernel_fields
from tokenfuse.exporter.onnx_export import validate_under_seeds
from tokenfuse.exporter.settings import MergeOptions

PITOME = {"pitome": ("plain", 0.5), "pitome-bsm": ("bsm", 0.5), "pitome-text": ("text", 0.6)}  # (variant, margin)
RULES = {"tome": LayerRule("tome"), "turbo": LayerRule("turbo", turbo_weight=5.0), "crossget": LayerRule("crossget"),
         **{name: LayerRule("pitome", margin=margin, variant=variant) for name, (variant, margin) in PITOME.items()}}
TOLERANCE = onnx_export.TOLERANCES["fp32"]["near_tie"]
N, D = 65, 16


def anisotropic_case(rule: LayerRule, seed: int, padded: bool = False, frozen: bool = False):
    """Metrics as trained models give them: one shared direction and small differences (cosines
    crowd near 1), a run of identical rows (exact ties) and rows a rounding error apart (near ties)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=generator)
    metric = 3 * base + 0.3 * torch.randn(3, N, D, generator=generator)
    metric[:, 10:16] = metric[:, 10:11]
    metric[:, 20:24] = metric[:, 20:21] + 1e-6 * torch.randn(3, 4, D, generator=generator)
    cls_attn = torch.softmax(torch.randn(3, N, generator=generator), -1)
    valid = (torch.arange(N) < torch.tensor([[N], [N - 9], [40]])) if padded else None
    hold = (torch.arange(N) == torch.tensor([[N - 1], [30], [39]])) if frozen else None
    r = max_removable(rule.name, N, 1 + frozen) * 2 // 3
    return dict(metric=metric, r=r, protected=1, cls_attn=cls_attn, valid=valid, frozen=hold)


def decide(rule, case, metric=None):
    kw = {k: v for k, v in case.items() if k != "metric"}
    return match_step(rule, case["metric"] if metric is None else metric, kw.pop("r"), **kw).dst_slot


def decision(rule, case) -> Decision:
    return Decision(rule, case["metric"], case["r"], case["protected"], case["cls_attn"], case["valid"], case["frozen"], decide(rule, case))


LAYOUTS = [pytest.param(False, False, id="plain"), pytest.param(True, False, id="padded"), pytest.param(True, True, id="padded-frozen")]


@pytest.mark.parametrize("padded, frozen", LAYOUTS)
@pytest.mark.parametrize("name", RULES)
def test_near_ties_are_excused_and_only_they(name, padded, frozen):
    """The reference's own decision agrees fully; one computed from a metric a rounding error away
    differs (raw) but is excused; swapping two sources' slots is caught."""
    rule = RULES[name]
    excused = 0
    for seed in range(4):
        case = anisotropic_case(rule, seed, padded, frozen)
        d = decision(rule, case)
        own = judge(d, d.slots, TOLERANCE)
        assert own.equal == own.tokens and own.wrong == 0
        noisy = case["metric"] * (1 + 1e-5 * torch.randn(case["metric"].shape, generator=torch.Generator().manual_seed(seed)))
        nearby = judge(d, decide(rule, case, noisy), TOLERANCE)
        assert nearby.wrong == 0, (seed, nearby)
        excused += nearby.excused
        swapped = d.slots.clone()
        merged = [t for t in range(1, N) if (d.slots[0] == d.slots[0, t]).sum() > 1]
        swapped[0, merged[0]] = (d.slots[0, merged[0]] + 1) % (N - case["r"])  # a merged token moved to the next slot
        assert judge(d, swapped, TOLERANCE).wrong > 0
    if name != "crossget":  # CrossGET's choices hold on these metrics; the MPNet exports below flip some
        assert excused > 0, "the anisotropic cases hold near-ties that rounding flips"


@pytest.mark.parametrize("name", RULES)
def test_float64_reference_agrees_up_to_near_ties(name):
    """The independent NumPy reference, in float64, decides as PyTorch's fp32 does up to near-ties."""
    rule = RULES[name]
    fields = kernel_fields(rule)
    variant = {"plain": "plain", "bsm": "bsm-early", "text": "text"}[fields["variant"]]
    differing = 0
    for seed in range(4):
        case = anisotropic_case(rule, seed, padded=seed % 2 == 1)
        d = decision(rule, case)
        theirs = reference_plan(rule.name, case["metric"].double().numpy(), case["r"], protected=1, layer=0,
                                num_layers=2 if variant == "bsm-early" else 1, margin=fields["margin"], alpha=fields["alpha"],
                                pitome_variant=variant, cls_attn=case["cls_attn"].double().numpy(),
                                turbo_alpha=fields["turbo_weight"] / 30.0,
                                valid=None if case["valid"] is None else case["valid"].numpy())
        result = judge(d, torch.from_numpy(theirs), TOLERANCE)
        assert result.wrong == 0, (seed, result)
        differing += result.tokens - result.equal
    print(f"\n{name}: {differing} tokens in another slot than fp32's, all excused as near-ties")


def _argmin_partner(sim, bias):
    """The least similar candidate (bias: 0 for candidates, -BIG for the others)."""
    return (sim - bias.unsqueeze(-2)).argmin(-1)


PLANTS = {
    "argmin partner": ("best_partner", _argmin_partner),
    "reversed ToMe priority": ("bipartite_priority", lambda sim, b_bias, penalty=None: -ORIGINAL["bipartite_priority"](sim, b_bias, penalty)),
    "reversed energy": ("pitome_energy", lambda *args: -ORIGINAL["pitome_energy"](*args)),
    "reversed CrossGET key": ("crossget_key", lambda *args: -ORIGINAL["crossget_key"](*args)),
}
ORIGINAL = {name: getattr(methods, name) for name, _ in PLANTS.values()}
APPLIES = {"argmin partner": RULES, "reversed ToMe priority": ("tome", "turbo", "pitome-bsm"),
           "reversed energy": ("pitome", "pitome-bsm", "pitome-text"), "reversed CrossGET key": ("crossget",)}


@pytest.mark.parametrize("plant", PLANTS)
def test_planted_wrong_rules_are_caught(monkeypatch, plant):
    attribute, wrong_rule = PLANTS[plant]
    for name in APPLIES[plant]:
        rule = RULES[name]
        case = anisotropic_case(rule, 7, padded=True)
        d = decision(rule, case)
        with monkeypatch.context() as patched:
            patched.setattr(methods, attribute, wrong_rule)
            planted = decide(rule, case)
        assert judge(d, planted, TOLERANCE).wrong > 0.1 * case["r"], (plant, name)


# ---- exports of models with trained-like statistics ---------------------------------------------

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=300)
SEQ_LEN = 40


@pytest.fixture(scope="module")
def mpnet_dir(tmp_path_factory):
    """A small MPNet (relative positions only: repeated words and padding give near-identical keys)."""
    import transformers as T

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mpnet")
    trained_like(T.MPNetModel(T.MPNetConfig(**TEXT))).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("method", ["tome", "pitome", "crossget", "turbo"])
def test_export_validates_under_twenty_seeds(mpnet_dir, method):
    """The same export, validated under 20 seeds, passes 20 times, with near-ties excused along the way."""
    adapter = load_model(f"hf:{mpnet_dir}", seq_len=SEQ_LEN)
    reports = validate_under_seeds(adapter, MergeOptions(method=method, r=0.8).resolve(adapter)[0], range(20))
    assert all(r["passed"] for r in reports), [r["failures"] for r in reports if not r["passed"]]
    assert max(r["max_abs_error"] for r in reports) <= 1e-5  # the same decisions give the same numbers
    raw, excused = min(r["merge_agreement_raw"] for r in reports), sum(r["near_ties_excused"] for r in reports)
    print(f"\n{method}: identical decisions down to {raw:.3f} of tokens in a layer; {excused} near-tie tokens excused over 20 seeds")
    if method == "crossget":
        assert raw < 1.0 and excused > 0  # this model does produce near-ties, which the old gate counted as wrong


def test_planted_wrong_rule_in_the_export_fails_validation(tmp_path, mpnet_dir, monkeypatch):
    """An exported graph whose second merge (of two) picks the least similar partner fails, and writes nothing."""
    adapter = load_model(f"hf:{mpnet_dir}", seq_len=SEQ_LEN)
    calls = []

    def second_layer_argmin(sim, bias):
        calls.append(1)
        return (_argmin_partner if len(calls) % 2 == 0 else ORIGINAL["best_partner"])(sim, bias)

    real_trace = onnx_export.trace

    def planted_trace(*args, **kwargs):
        calls.clear()
        with monkeypatch.context() as patched:
            patched.setattr(methods, "best_partner", second_layer_argmin)
            return real_trace(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "trace", planted_trace)
    path = tmp_path / "planted.onnx"
    with pytest.raises(UsageError, match="merge_agreement"):
        export(adapter, path, method="pitome", r=0.8, seed=0, log=lambda *_: None)
    assert not path.exists() and not path.with_suffix(".json").exists()


# ---- inputs with real inputs' statistics --------------------------------------------------------

def test_natural_text_is_framed_as_the_tokenizer_frames_it(minilm_path):
    from transformers import AutoTokenizer

    adapter = load_model(f"hf:{minilm_path}", seq_len=64)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    inputs = adapter.natural_inputs(16, torch.Generator().manual_seed(0))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    lengths = mask.sum(1)
    assert ids.shape == mask.shape == (16, 64)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert (ids.gather(1, (lengths - 1).unsqueeze(1)) == tokenizer.sep_token_id).all()
    assert (ids[mask == 0] == tokenizer.pad_token_id).all() and (mask.cumsum(1).max(1).values == lengths).all()
    assert lengths.min() <= 12 and lengths.max() >= 40  # queries to passages
    body = ids[(mask > 0) & (ids != tokenizer.cls_token_id) & (ids != tokenizer.sep_token_id)]
    assert not set(body.tolist()) & set(tokenizer.all_special_ids)
    words = tokenizer.convert_ids_to_tokens(body.tolist())
    assert np.mean([w.isascii() for w in words]) > 0.9
    assert len(set(body.tolist())) < len(body)  # frequent words repeat, as in real text


def test_natural_pixels_look_like_photographs():
    adapter = load_model("timm:vit_tiny_patch16_224", random_init=True)
    pixels = adapter.natural_inputs(4, torch.Generator().manual_seed(0))["pixel_values"]
    assert pixels.shape == (4, 3, 224, 224)
    spec = adapter.preprocess()
    raw = pixels * torch.tensor(spec["std"]).view(1, 3, 1, 1) + torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    patches = raw.unfold(2, 16, 16).unfold(3, 16, 16).reshape(4, 3, 196, 256)
    assert (patches[0].std(-1) < 1e-6).any()  # a flat region: identical patches (exact ties)
    neighbours = torch.corrcoef(torch.stack([raw[1, 0, :, :-1].flatten(), raw[1, 0, :, 1:].flatten()]))[0, 1]
    assert neighbours > 0.7  # smooth, as natural images are; white noise gives 0


def test_validation_reports_every_gate_per_input_kind(tmp_path, mpnet_dir):
    adapter = load_model(f"hf:{mpnet_dir}", seq_len=SEQ_LEN)
    manifest = export(adapter, tmp_path / "m.onnx", method="pitome", r=0.8, seed=3, log=lambda *_: None)
    validation = manifest["validation"]
    assert set(validation["cases"]) == {"random-1", "random-3", "natural-3"}
    for case in validation["cases"].values():
        assert case["free_running_outputs"] == ["embedding"]
        for key in ("merge_agreement", "merge_agreement_raw", "near_ties_excused", "max_abs_error", "cosine_min",
                    "free_running_cosine_min", "free_running_max_rel_error"):
            assert key in case
    assert validation["tolerance"]["near_tie"] == 1e-4 and validation["passed"]


def test_mpnet_positions_round_the_same_in_every_runtime(tmp_path):
    """With the same decisions the error stays at rounding level under every seed. MPNet's merged
    positions were once size-weighted means merged again: their rounding flipped a .5 either way
    between ONNX Runtime and PyTorch, so another relative-position bucket (with the old code, 8 of
    these 30 seeds exceeded 1e-4, up to 7e-3; tome on 6 layers with a strong position bias)."""
    import transformers as T

    torch.manual_seed(0)
    model = T.MPNetModel(T.MPNetConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, vocab_size=300))
    with torch.no_grad():  # a relative position bias far from its small initialisation, as trained models have
        model.encoder.relative_attention_bias.weight.normal_(0, 3.0)
    model.save_pretrained(tmp_path / "mpnet")
    adapter = load_model(f"hf:{tmp_path / 'mpnet'}", seq_len=96)
    reports = validate_under_seeds(adapter, MergeOptions(method="tome", r=0.85).resolve(adapter)[0], range(30))
    assert max(r["max_abs_error"] for r in reports) <= 1e-5, sorted(r["max_abs_error"] for r in reports)[-3:]


@pytest.mark.parametrize("name", ["vit-cls", "clip-vision", "clip-text", "bert", "timm-vit"])
def test_other_families_with_trained_like_keys_validate_under_any_seed(hf_dirs, name):
    """The conftest families (HF ViT, CLIP towers, BERT) and a small timm ViT, keys made trained-like:
    every method validates under five seeds (random and natural inputs)."""
    if name == "timm-vit":
        import timm

        adapter = adapter_for(timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, depth=3, num_classes=5))
    else:
        adapter = load_model(f"hf:{hf_dirs[name]}", seq_len=32, tower="text" if name == "clip-text" else "vision")
    trained_like(adapter.model)
    for method in ("tome", "pitome", "crossget", "turbo"):
        settings, _ = MergeOptions(method=method, r=0.8, turbo_threshold=0).resolve(adapter)
        for report in validate_under_seeds(adapter, settings, range(5)):
            assert report["passed"], (method, report["seed"], report["failures"])


@pytest.mark.parametrize("method", ["tome", "pitome", "crossget", "turbo"])
def test_minilm_validates_under_any_seed(minilm_path, method):
    """all-MiniLM-L6-v2, its real weights: five seeds, five passes (docs/validation.md has ten, fp16 too)."""
    adapter = load_model(f"hf:{minilm_path}", seq_len=128)
    reports = validate_under_seeds(adapter, MergeOptions(method=method, r=0.9).resolve(adapter)[0], range(5))
    assert all(r["passed"] for r in reports), [r["failures"] for r in reports]
