"""Text models: padding never merges into real tokens and does not change their results."""

from __future__ import annotations

import pytest
import torch

from tokenfuse.exporter.settings import MergeOptions

pytestmark = pytest.mark.xdist_group("minilm")  # one pytest-xdist worker makes the shared MiniLM adapter once

METHODS = ["tome", "pitome", "crossget", "turbo"]


@pytest.fixture(scope="module")
def minilm(shared_exports):
    return shared_exports.adapter("minilm")  # all-MiniLM-L6-v2 at seq-len 128, loaded once per session


def _batch(lengths, seq_len=128, seed=0, pad_ids=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (len(lengths), seq_len), generator=g)
    mask = (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).long()
    filler = torch.zeros_like(ids) if pad_ids is None else pad_ids
    return {"input_ids": torch.where(mask > 0, ids, filler), "attention_mask": mask}


def _run(adapter, method, inputs):
    settings, _ = MergeOptions(method=method, r=0.9).resolve(adapter)
    with torch.no_grad():
        return adapter.run(settings, inputs)


@pytest.mark.parametrize("method", METHODS)
def test_short_texts_merge_only_padding_so_embeddings_equal_unmerged(minilm, method):
    """With enough padding to absorb every merge, the real tokens are exactly the unmerged model's."""
    inputs = _batch([20, 45, 9])
    merged, state = _run(minilm, method, inputs)
    unmerged, _ = _run(minilm, "none", inputs)
    assert torch.allclose(merged["embedding"], unmerged["embedding"], atol=1e-5)
    # every real token is still its own token (size 1) and the real count is unchanged
    real_sizes = merged["token_sizes"][..., 0] * merged["token_mask"]
    assert torch.equal(merged["token_mask"].sum(1), inputs["attention_mask"].sum(1))
    assert torch.all((real_sizes == 0) | (real_sizes == 1))


@pytest.mark.parametrize("method", METHODS)
def test_padding_content_does_not_reach_real_tokens(minilm, method):
    """Long texts merge real tokens too; what sits in the padding must not matter."""
    lengths = [120, 127, 100, 30]
    zero_pad = _batch(lengths, seed=1)
    noise = torch.randint(1000, 30000, (4, 128), generator=torch.Generator().manual_seed(9))
    noisy_pad = _batch(lengths, seed=1, pad_ids=noise)
    a, _ = _run(minilm, method, zero_pad)
    b, _ = _run(minilm, method, noisy_pad)
    assert torch.allclose(a["embedding"], b["embedding"], atol=1e-5)
    for row in range(len(lengths)):  # the same real tokens come out (their slots may differ)
        real_a, real_b = (_real_tokens(out, row) for out in (a, b))
        assert real_a.shape == real_b.shape
        assert torch.allclose(real_a, real_b, atol=1e-4)


def _real_tokens(out, row):
    keep = out["token_mask"][row] > 0
    tokens = torch.cat([out["token_sizes"][row, keep], out["last_hidden_state"][row, keep]], dim=1)
    return tokens[torch.argsort(tokens[:, 1])]


@pytest.mark.parametrize("method", METHODS)
def test_slots_holding_real_tokens_hold_no_padding_weight(minilm, method):
    """A merged real token's size counts real tokens only: sizes of real slots add up to the real length."""
    inputs = _batch([127, 90, 64, 3], seed=2)
    out, _ = _run(minilm, method, inputs)
    real_total = (out["token_sizes"][..., 0] * out["token_mask"]).sum(1)
    assert torch.equal(real_total, inputs["attention_mask"].sum(1).float())
