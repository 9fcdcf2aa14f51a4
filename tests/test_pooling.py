"""Sentence-transformers directories: the `embedding` output pools and normalises as the directory
says, `--method none` equals SentenceTransformer.encode, every mode exports and validates merged,
and the manifest records the pooling."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from gates import assert_validated_exactly
from tokenfuse.cli import main
from tokenfuse.exporter import export, load_model
from tokenfuse.exporter.settings import MergeOptions

# (mode, normalize): every sentence-transformers pooling mode, with and without Normalize
MODES = [("mean", False), ("mean_sqrt_len_tokens", False), ("cls", True), ("max", False), ("weightedmean", True), ("lasttoken", True)]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(495)]  # the test BERT's 500 ids
SEQ_LEN = 24


@pytest.fixture(scope="module")
def st_dirs(tmp_path_factory, hf_dirs):
    """The small random BERT as a sentence-transformers directory, once per pooling mode."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("st")
    bert = root / "bert"
    shutil.copytree(hf_dirs["bert"], bert)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=False).save_pretrained(bert)
    dirs = {}
    for mode, normalize in MODES:
        transformer = Transformer(str(bert), max_seq_length=SEQ_LEN)
        modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)] + ([Normalize()] if normalize else [])
        path = root / mode
        SentenceTransformer(modules=modules, device="cpu").save(str(path))
        dirs[mode] = str(path)
    return dirs


def _texts(count: int, longest: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB[5:]) for _ in range(rng.randint(1, longest))) for _ in range(count)]


def _embed(adapter, texts, method="none", r=0.8):
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(adapter.directory))(
        texts, padding="max_length", truncation=True, max_length=adapter.seq_len, return_tensors="pt")
    settings, _ = MergeOptions(method=method, r=r).resolve(adapter)
    with torch.no_grad():
        outputs, state = adapter.run(settings, {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]})
    return outputs, state


def _encode(directory, texts) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(directory, device="cpu").encode(texts, convert_to_tensor=True, batch_size=len(texts))


@pytest.mark.parametrize("mode, normalize", MODES)
def test_none_equals_sentence_transformers_encode(st_dirs, mode, normalize):
    adapter = load_model(f"hf:{st_dirs[mode]}", seq_len=SEQ_LEN)
    assert adapter.pooling.to_json() == {"mode": mode, "normalize": normalize}
    texts = _texts(6, SEQ_LEN - 2)
    ours, _ = _embed(adapter, texts)
    assert torch.allclose(ours["embedding"], _encode(st_dirs[mode], texts), atol=1e-5)


@pytest.mark.parametrize("mode, normalize", MODES)
def test_padding_absorbs_the_merges_so_short_texts_pool_as_unmerged(st_dirs, mode, normalize):
    """With more padding than merges, real tokens never merge (but move: PiToMe reorders), so every
    mode, including those that follow tokens through the merges, gives the unmerged embedding."""
    adapter = load_model(f"hf:{st_dirs[mode]}", seq_len=SEQ_LEN)
    texts = _texts(5, 4, seed=1)
    merged, state = _embed(adapter, texts, method="pitome", r=0.8)
    assert state.slots and merged["last_hidden_state"].shape[1] < SEQ_LEN
    assert torch.allclose(merged["embedding"], _encode(st_dirs[mode], texts), atol=1e-5)


def _final_slot(state, batch: int, token: int) -> int:
    for slots in state.slots:
        token = int(slots[batch, token])
    return token


@pytest.mark.parametrize("mode", ["weightedmean", "lasttoken"])
def test_positional_modes_follow_tokens_through_real_merges(st_dirs, mode):
    """A loop over input tokens, following each one's slot layer by layer, against the graph's version."""
    adapter = load_model(f"hf:{st_dirs[mode]}", seq_len=SEQ_LEN)
    texts = _texts(4, SEQ_LEN - 2, seed=2)
    merged, state = _embed(adapter, texts, method="tome", r=4)
    x = merged["last_hidden_state"].double()
    lengths = state.mask.sum(1).tolist()
    for b, length in enumerate(lengths):
        if mode == "lasttoken":
            expected = x[b, _final_slot(state, b, length - 1)]
        else:
            weights = torch.zeros(x.shape[1], dtype=torch.float64)
            for token in range(length):
                weights[_final_slot(state, b, token)] += token + 1
            expected = (weights[:, None] * x[b]).sum(0) / weights.sum()
        expected = torch.nn.functional.normalize(expected, dim=0)
        assert torch.allclose(merged["embedding"][b].double(), expected, atol=1e-5), (b, mode)


@pytest.mark.parametrize("mode, normalize", MODES)
def test_merged_exports_validate_and_record_the_pooling(st_dirs, mode, normalize, tmp_path):
    manifest = export(f"hf:{st_dirs[mode]}", tmp_path / "m.onnx", method="pitome", r=0.8, seq_len=SEQ_LEN, seed=0, log=lambda *_: None)
    assert_validated_exactly(manifest)
    assert manifest["pooling"] == {"mode": mode, "normalize": normalize}


def test_a_plain_hf_directory_keeps_the_size_weighted_mean(hf_dirs, tmp_path):
    manifest = export(f"hf:{hf_dirs['bert']}", tmp_path / "m.onnx", method="none", seq_len=SEQ_LEN, validate=False, log=lambda *_: None)
    assert manifest["pooling"] == {"mode": "mean", "normalize": False}


REAL_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The committee approved the budget after a long debate.",
    "Heavy rain caused flooding in several coastal towns overnight.",
    "She forgot her umbrella at the station.",
    "Researchers trained the network on a million labelled images.",
    "Is this the way to the museum?",
]


def test_real_minilm_none_equals_encode_and_manifest(minilm_path, tmp_path):
    adapter = load_model(f"hf:{minilm_path}", seq_len=128)
    assert adapter.pooling.to_json() == {"mode": "mean", "normalize": True}
    ours, _ = _embed(adapter, REAL_SENTENCES)
    assert torch.allclose(ours["embedding"], _encode(minilm_path, REAL_SENTENCES), atol=1e-5)


BAD_CONFIGS = {
    "unknown mode": ({"pooling_mode": "median"}, "unknown pooling mode 'median'"),
    "unknown legacy mode": ({"pooling_mode_median_tokens": True}, "unknown pooling mode"),
    "two modes": ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "combined"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS) + ["dense module"])
def test_unsupported_pooling_is_one_line_exit_2(case, st_dirs, tmp_path, capsys):
    directory = tmp_path / "model"
    shutil.copytree(st_dirs["mean"], directory)
    if case == "dense module":
        modules = json.loads((directory / "modules.json").read_text())
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (directory / "modules.json").write_text(json.dumps(modules))
        phrase = "Dense"
    else:
        config, phrase = BAD_CONFIGS[case]
        (directory / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 64, **config}))
    out = tmp_path / "out" / "m.onnx"
    code = main(["export", "--model", f"hf:{directory}", "--seq-len", str(SEQ_LEN), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("tokenfuse: error:") and phrase in err, err
    assert not out.parent.exists()
