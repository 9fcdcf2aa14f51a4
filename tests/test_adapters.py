"""Every supported family: `none` is the original model, merged exports validate, and `patch`
merge-enables a PyTorch model in place. (The merged forward, `patch` and the exports against the
independent reference, with TensorRT-RTX builds: tests/test_reference_forward.py.)"""

from __future__ import annotations

import pytest
import timm
import torch

from gates import assert_validated_exactly
from tokenfuse.exporter import export, load_model, patch
from tokenfuse.exporter.adapters import adapter_for
from tokenfuse.exporter.settings import MergeOptions

# (directory, tower): "clip" is a full CLIPModel, exported once per tower
HF = [("vit", "vision"), ("vit-cls", "vision"), ("clip-vision", "vision"), ("clip", "vision"),
      ("clip", "text"), ("clip-text", "text"), ("bert", "vision")]
HF_IDS = [f"{d}-{t}" if d == "clip" else d for d, t in HF]


def _original(name, tower, adapter, inputs):
    """The unpatched model's own forward, in the adapter's output names."""
    model = adapter.model
    with torch.no_grad():
        if name == "bert":
            return {"last_hidden_state": model(**inputs).last_hidden_state}
        if name == "clip" and tower == "text":
            out = model.get_text_features(**inputs)
            return {"text_embeds": out.pooler_output, "last_hidden_state": out.last_hidden_state}
        if name == "clip-text":
            out = model(**inputs)
            return {"text_embeds": out.text_embeds, "last_hidden_state": out.last_hidden_state}
        if name == "clip":
            out = model.get_image_features(pixel_values=inputs["pixel_values"])
            return {"image_embeds": out.pooler_output, "last_hidden_state": out.last_hidden_state}
        out = model(pixel_values=inputs["pixel_values"])
        if name == "vit-cls":
            return {"logits": out.logits}
        return {"pooler_output": out.pooler_output, "last_hidden_state": out.last_hidden_state}


@pytest.mark.parametrize("name, tower", HF, ids=HF_IDS)
def test_hf_none_equals_original(hf_dirs, name, tower):
    adapter = load_model(f"hf:{hf_dirs[name]}", seq_len=24, tower=tower)
    inputs = adapter.random_inputs(3, torch.Generator().manual_seed(1))
    settings, _ = MergeOptions(method="none").resolve(adapter)
    with torch.no_grad():
        ours, _ = adapter.run(settings, inputs)
    for key, value in _original(name, tower, adapter, inputs).items():
        if key == "last_hidden_state" and "attention_mask" in inputs:
            keep = inputs["attention_mask"].unsqueeze(-1)
            value, mine = value * keep, ours[key] * keep
        else:
            mine = ours[key]
        assert torch.allclose(mine, value, atol=1e-5), key


# built only by the test that uses it (not at collection)
TIMM_VARIANTS = {
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64)),
    "avg-pool": ("vit_tiny_patch16_224", dict(img_size=64, global_pool="avg", class_token=False, num_classes=7)),
    "register-tokens": ("vit_tiny_patch16_224", dict(img_size=64, reg_tokens=4)),
    "head-less": ("vit_tiny_patch16_224", dict(img_size=64, num_classes=0)),
    "one-channel": ("vit_tiny_patch16_224", dict(img_size=56, patch_size=4, in_chans=1, num_classes=10, depth=2)),
}


@pytest.mark.parametrize("name", list(TIMM_VARIANTS))
def test_timm_variants_none_equals_original_and_merged_validates(name, tmp_path):
    torch.manual_seed(0)
    arch, options = TIMM_VARIANTS[name]
    model = timm.create_model(arch, **options).eval()
    adapter = adapter_for(model)
    assert adapter.protected == model.num_prefix_tokens
    pixels = torch.randn(2, adapter.channels, *adapter.image_size)
    settings, _ = MergeOptions(method="none").resolve(adapter)
    with torch.no_grad():
        ours, _ = adapter.run(settings, {"pixel_values": pixels})
        assert torch.allclose(next(iter(ours.values())), model(pixels), atol=1e-5)
    manifest = export(adapter, tmp_path / "m.onnx", method="pitome", r=0.8, seed=0, log=lambda *_: None)
    assert_validated_exactly(manifest)
    assert manifest["settings"]["protected_tokens"] == model.num_prefix_tokens


def test_patch_timm_in_place_merges_and_keeps_protected_tokens():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(pixels)
    same = patch(model, method="pitome", r=0.8)
    assert same is model and type(model).__name__ == "TokenMergedVisionTransformerDistilled"
    assert isinstance(model, timm.models.deit.VisionTransformerDistilled)
    with torch.no_grad():
        after = model(pixels)
    assert after.shape == before.shape and not torch.allclose(after, before)
    adapter = adapter_for(model)
    settings, _ = MergeOptions(method="pitome", r=0.8).resolve(adapter)
    with torch.no_grad():
        expected, state = adapter.run(settings, {"pixel_values": pixels})
    drops = [n_out < n_in for n_in, n_out in zip((18,) + settings.schedule, settings.schedule)]
    assert torch.equal(after, expected["logits"]) and len(state.slots) == sum(drops) > 0
    assert all(torch.equal(slots[:, :2], torch.tensor([[0, 1]] * 2)) for slots in state.slots)


def test_patch_bert_takes_any_length(hf_dirs):
    from transformers import BertModel

    model = BertModel.from_pretrained(hf_dirs["bert"]).eval()
    patch(model, method="tome", r=2)
    for length in (9, 30):
        ids = torch.randint(1, 400, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            out = model(input_ids=ids)
        assert out["last_hidden_state"].shape == (2, length - 3 * 2, 64)
        assert torch.equal(out["token_sizes"].sum((1, 2)), torch.full((2,), float(length)))


def test_patch_refuses_unsupported_models():
    from tokenfuse.exporter.errors import UsageError

    with pytest.raises(UsageError, match="supported models"):
        patch(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("method", ["tome", "pitome", "crossget", "turbo"])
def test_clip_text_pools_at_eos_and_padding_absorbs_merges(hf_dirs, method):
    """Short texts in a long window: only padding merges, so EOS pooling equals the unmerged model."""
    adapter = load_model(f"hf:{hf_dirs['clip-text']}", tower="text", seq_len=60)
    ids = torch.full((2, 60), 49407)
    ids[0, :5] = torch.tensor([49406, 320, 1125, 539, 49407])
    ids[1, :3] = torch.tensor([49406, 2368, 49407])
    inputs = {"input_ids": ids, "attention_mask": (torch.arange(60) < torch.tensor([[5], [3]])).long()}
    merged_settings, _ = MergeOptions(method=method, r=0.9, turbo_threshold=0).resolve(adapter)
    plain_settings, _ = MergeOptions(method="none").resolve(adapter)
    with torch.no_grad():
        merged, state = adapter.run(merged_settings, inputs)
        plain, _ = adapter.run(plain_settings, inputs)
        original = adapter.model(**inputs).text_embeds
    assert len(state.slots) == 3 and merged["last_hidden_state"].shape[1] < 60
    assert torch.allclose(plain["text_embeds"], original, atol=1e-5)
    assert torch.allclose(merged["text_embeds"], original, atol=1e-5)
    assert torch.equal(state.frozen[:, -1], torch.tensor([True, True]))


def test_mae_models_default_to_no_proportional_attention():
    """As ToMe does for MAE-pretrained models (docs/cli.md: `timm:NAME.mae`); --prop-attn overrides."""
    mae = load_model("timm:vit_base_patch16_224.mae", random_init=True)
    assert MergeOptions().resolve(mae)[0].prop_attn is False
    assert MergeOptions(prop_attn=True).resolve(mae)[0].prop_attn is True
    assert MergeOptions().resolve(adapter_for(timm.create_model("vit_tiny_patch16_224", depth=1)))[0].prop_attn is True
