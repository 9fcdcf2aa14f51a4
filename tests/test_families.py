"""More model families, each built from a small config: RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT,
MPNet, DeiT, DINOv2 (with and without registers), SigLIP vision and timm's MAP-pooled ViTs.

`none` equals the model's own forward; every method exports, validates in ONNX Runtime and builds
with TensorRT-RTX; the pooling heads and MPNet's positions follow the merged tokens' sizes.
"""

from __future__ import annotations

import pytest
import timm
import torch

from gates import assert_validated_exactly
from trained_like import trained_like
from tokenfuse.engines.build import compile_engine
from tokenfuse.exporter import export, load_model, patch
from tokenfuse.exporter.adapters import adapter_for
from tokenfuse.exporter.errors import UsageError
from tokenfuse.exporter.onnx_export import validate_under_seeds
from tokenfuse.exporter.settings import MergeOptions

METHODS = ["tome", "pitome", "crossget", "turbo"]
SEQ_LEN = 24
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=300)
IMAGE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=4)


def _hf_models():
    import transformers as T

    return {
        "roberta": T.RobertaModel(T.RobertaConfig(**TEXT)),
        "xlm-roberta": T.XLMRobertaModel(T.XLMRobertaConfig(**TEXT)),
        "electra": T.ElectraModel(T.ElectraConfig(**TEXT, embedding_size=16)),
        "camembert": T.CamembertModel(T.CamembertConfig(**TEXT)),  # a BERT-like model with another name
        "distilbert": T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=300)),
        "mpnet": T.MPNetModel(T.MPNetConfig(**TEXT)),
        "deit-distilled": T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**IMAGE, num_labels=5)),
        "deit": T.DeiTModel(T.DeiTConfig(**IMAGE)),
        "dinov2": T.Dinov2ForImageClassification(T.Dinov2Config(**IMAGE, layerscale_value=0.3, num_labels=5)),
        "dinov2-base": T.Dinov2Model(T.Dinov2Config(**IMAGE)),
        "dinov2-registers": T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**IMAGE, num_register_tokens=4)),
        "siglip-vision": T.SiglipVisionModel(T.SiglipVisionConfig(**IMAGE)),
        "siglip": T.SiglipModel(T.SiglipConfig(vision_config=IMAGE, text_config={k: v for k, v in TEXT.items()})),
    }


HF_NAMES = ["roberta", "xlm-roberta", "electra", "camembert", "distilbert", "mpnet", "deit-distilled", "deit", "dinov2",
            "dinov2-base", "dinov2-registers", "siglip-vision", "siglip"]
EXPORTED = ["roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "deit-distilled", "dinov2", "dinov2-registers", "siglip-vision"]
PROTECTED = {"deit-distilled": 2, "deit": 2, "dinov2-registers": 5, "siglip-vision": 0, "siglip": 0}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    models = _hf_models()
    assert list(models) == HF_NAMES
    for name, model in models.items():
        model.save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def _load(family_dirs, name):
    return load_model(f"hf:{family_dirs[name]}", seq_len=SEQ_LEN)


def _compare_with_original(adapter, inputs, original: dict):
    """Every output the model's own forward also gives (padding rows of hidden states excluded)."""
    settings, _ = MergeOptions(method="none").resolve(adapter)
    with torch.no_grad():
        ours, _ = adapter.run(settings, inputs)
    compared = [key for key in ours if original.get(key) is not None and key != "token_sizes"]
    assert next(iter(ours)) in compared or "embedding" in ours
    for key in compared:
        mine, theirs = ours[key], original[key]
        if key == "last_hidden_state" and "attention_mask" in inputs:
            keep = inputs["attention_mask"].unsqueeze(-1)
            mine, theirs = mine * keep, theirs * keep
        assert torch.allclose(mine, theirs, atol=1e-5), key
    return compared


@pytest.mark.parametrize("name", HF_NAMES)
def test_none_equals_the_models_own_forward(family_dirs, name):
    adapter = _load(family_dirs, name)
    assert adapter.protected == PROTECTED.get(name, 1)
    inputs = adapter.random_inputs(3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model = adapter.model
        original = model.vision_model(**inputs) if name == "siglip" else model(**inputs)
    assert _compare_with_original(adapter, inputs, original)


# TensorRT-RTX builds: one method per family, in turn, so every method is built on text and vision
# families (a family changes the model around the merge, not the merge's ops; every method is built
# on BERT and CLIP text in test_reference_forward, and on ViT-B/16 and MiniLM in test_export under --slow).
BUILT_METHOD = {name: METHODS[i % len(METHODS)] for i, name in enumerate(EXPORTED)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", EXPORTED)
def test_merged_exports_validate_and_build(family_dirs, name, method, tmp_path):
    out = tmp_path / "m.onnx"
    manifest = export(f"hf:{family_dirs[name]}", out, method=method, r=0.8, seq_len=SEQ_LEN, seed=0, log=lambda *_: None, turbo_threshold=0)
    assert_validated_exactly(manifest)
    assert manifest["schedule"][-1] < manifest["budget"]["layers"][0]["tokens_in"]
    assert manifest["settings"]["protected_tokens"] == PROTECTED.get(name, 1)
    if BUILT_METHOD[name] == method:
        assert compile_engine(out, batch=(1, 2, 2), log=lambda *_: None)[0]


@pytest.mark.parametrize("name", EXPORTED)
def test_trained_like_statistics_validate_for_every_method_under_any_seed(family_dirs, name):
    """Anisotropic keys (tests/trained_like.py) crowd candidate scores within rounding of each other:
    every method still validates, under five seeds each (random and natural inputs)."""
    adapter = _load(family_dirs, name)
    trained_like(adapter.model)
    for method in METHODS:
        settings, _ = MergeOptions(method=method, r=0.8, turbo_threshold=0).resolve(adapter)
        for report in validate_under_seeds(adapter, settings, range(5)):
            assert report["passed"], (method, report["seed"], report["failures"])


def _timm_map_models():
    small = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    return {
        "map-with-cls": timm.create_model("vit_tiny_patch16_224", global_pool="map", num_classes=5, **small),
        "siglip-style": timm.create_model("vit_base_patch16_siglip_224", num_classes=0, **small),
    }


TIMM_NAMES = ["map-with-cls", "siglip-style"]


@pytest.fixture(scope="module")
def timm_map():
    torch.manual_seed(0)
    models = {name: model.eval() for name, model in _timm_map_models().items()}
    assert list(models) == TIMM_NAMES
    return models


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_map_none_equals_original(timm_map, name):
    model = timm_map[name]
    adapter = adapter_for(model)
    assert model.attn_pool is not None and adapter.protected == model.num_prefix_tokens
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    settings, _ = MergeOptions(method="none").resolve(adapter)
    with torch.no_grad():
        ours, _ = adapter.run(settings, {"pixel_values": pixels})
        assert torch.allclose(next(iter(ours.values())), model(pixels), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_map_exports_validate_and_build(timm_map, name, method, tmp_path):
    adapter = adapter_for(timm_map[name])
    out = tmp_path / "m.onnx"
    manifest = export(adapter, out, method=method, r=0.8, seed=0, log=lambda *_: None, turbo_threshold=0)
    assert_validated_exactly(manifest)
    assert manifest["schedule"][-1] < manifest["budget"]["layers"][0]["tokens_in"]
    assert compile_engine(out, batch=(1, 2, 2), log=lambda *_: None)[0]


def _duplicate_then_merged(x):
    """x with its token 3 repeated at the end (sizes all 1), and x with token 3 of size 2."""
    repeated = torch.cat([x, x[:, 3:4]], dim=1)
    sizes = torch.ones(x.shape[0], x.shape[1], 1)
    sizes[:, 3] = 2
    return (repeated, torch.ones(x.shape[0], x.shape[1] + 1, 1)), (x, sizes)


def test_pooling_heads_count_a_merged_token_as_its_members(family_dirs, timm_map):
    """Two identical tokens pool as one token of size 2 does: proportional attention in the head."""
    from tokenfuse.exporter.adapters.siglip import attention_pooling_head
    from tokenfuse.exporter.adapters.timm_vit import _attention_pool

    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    (repeated, ones), (merged, sizes) = _duplicate_then_merged(x)
    head = _load(family_dirs, "siglip-vision").tower.head
    pools = [lambda t, s: attention_pooling_head(head, t, s), lambda t, s: _attention_pool(timm_map["siglip-style"].attn_pool, t, s)]
    with torch.no_grad():
        for pool in pools:
            assert torch.allclose(pool(repeated, ones), pool(merged, sizes), atol=1e-5)
            assert not torch.allclose(pool(merged, torch.ones_like(sizes)), pool(merged, sizes), atol=1e-3)


def test_mpnet_merged_tokens_sit_at_their_members_mean_position(family_dirs):
    """Composing each layer's slots gives every final token's members; its position is their mean."""
    adapter = _load(family_dirs, "mpnet")
    inputs = adapter.random_inputs(3, torch.Generator().manual_seed(4))
    settings, _ = MergeOptions(method="pitome", r=0.7).resolve(adapter)
    with torch.no_grad():
        out, state = adapter.run(settings, inputs)
    slot = torch.arange(SEQ_LEN).expand(3, -1)
    for layer_slots in state.slots:
        slot = layer_slots.gather(1, slot)
    real = inputs["attention_mask"] > 0
    final = state.position_sums.shape[1]
    members = (slot.unsqueeze(1) == torch.arange(final)[None, :, None]) & real.unsqueeze(1)  # [B, K, N]
    expected = (members * torch.arange(SEQ_LEN)).sum(-1) / members.sum(-1).clamp(min=1)
    keep = out["token_mask"] > 0
    assert (members.sum(-1) > 1).any()  # some real tokens did merge
    positions = state.position_sums / state.size[..., 0]
    assert torch.equal(state.position_sums[keep], (members * torch.arange(SEQ_LEN)).sum(-1)[keep].float())  # exact sums
    assert torch.allclose(positions[keep], expected[keep].float(), atol=1e-6)


def test_mpnet_strong_position_bias_still_equals_the_model(family_dirs):
    """With a relative position bias far from its small initialisation, `none` still equals the
    model's forward, and zeroing the bias changes it (the bias is applied, not a no-op)."""
    adapter = _load(family_dirs, "mpnet")  # its own copy of the weights
    bias = adapter.model.encoder.relative_attention_bias.weight
    inputs = adapter.random_inputs(2, torch.Generator().manual_seed(5))
    settings, _ = MergeOptions(method="none").resolve(adapter)
    with torch.no_grad():
        bias.normal_(0, 2, generator=torch.Generator().manual_seed(6))
        _compare_with_original(adapter, inputs, adapter.model(**inputs))
        ours, _ = adapter.run(settings, inputs)
        bias.zero_()
        without, _ = adapter.run(settings, inputs)
    assert (ours["embedding"] - without["embedding"]).abs().max() > 1e-3


def test_patch_finds_families_by_their_modules(family_dirs):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(family_dirs["distilbert"]).eval()
    patch(model, method="tome", r=2)
    with torch.no_grad():
        out = model(input_ids=torch.randint(1, 300, (2, 11)))
    assert out["last_hidden_state"].shape == (2, 11 - 2 * 2, 32)


def test_models_whose_blocks_look_like_no_family_are_refused(tmp_path):
    from transformers import AlbertConfig, AlbertModel

    AlbertModel(AlbertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, embedding_size=16)).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="not supported.*supported models"):
        load_model(f"hf:{tmp_path}")


def test_plugin_lowering_refuses_relative_positions(family_dirs, tmp_path):
    """The plugin node carries no token positions, so MPNet's relative position bias would see stale ones."""
    with pytest.raises(UsageError, match="relative position"):
        export(f"hf:{family_dirs['mpnet']}", tmp_path / "m.onnx", method="tome", r=2, seq_len=SEQ_LEN, lowering="plugin", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


SENTENCE_FAMILIES = ["roberta", "xlm-roberta", "electra", "distilbert", "mpnet"]


@pytest.mark.parametrize("name", SENTENCE_FAMILIES)
def test_sentence_transformers_directory_of_each_text_family(family_dirs, name, tmp_path):
    """A family saved as a sentence-transformers directory (mean pooling + Normalize): `none` equals
    SentenceTransformer.encode, and a merged export records the pooling and validates."""
    import shutil

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertTokenizerFast

    base = tmp_path / "base"
    shutil.copytree(family_dirs[name], base)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(295)]  # the configs' 300 ids
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), model_input_names=["input_ids", "attention_mask"]).save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=SEQ_LEN)
    directory = tmp_path / "st"
    SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="mean"), Normalize()],
                        device="cpu").save(str(directory))

    rng = torch.Generator().manual_seed(4)
    texts = [" ".join(vocab[5 + int(i)] for i in torch.randint(0, 295, (int(n),), generator=rng)) for n in (3, 9, 17, 22)]
    adapter = load_model(f"hf:{directory}", seq_len=SEQ_LEN)
    tokens = BertTokenizerFast.from_pretrained(str(directory))(
        texts, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="pt")
    settings, _ = MergeOptions(method="none").resolve(adapter)
    with torch.no_grad():
        ours, _ = adapter.run(settings, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    expected = SentenceTransformer(str(directory), device="cpu").encode(texts, convert_to_tensor=True, batch_size=len(texts))
    assert torch.allclose(ours["embedding"], expected, atol=1e-5)

    manifest = export(adapter, tmp_path / "m.onnx", method="pitome", r=0.8, seed=0, log=lambda *_: None)
    assert manifest["pooling"] == {"mode": "mean", "normalize": True}
    assert_validated_exactly(manifest)
