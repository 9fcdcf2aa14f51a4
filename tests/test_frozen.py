"""A frozen token (CLIP text's EOS, at a data-dependent position) never merges and ends in the last slot.

For methods that use position only to break ties (pitome, crossget), freezing a token must equal
taking it out, merging the rest, and appending it. For the position-split methods (tome, turbo)
the frozen token simply leaves its set: the others keep their parity.
"""

from __future__ import annotations

import pytest
import torch

from tokenfuse.exporter.methods import MethodConfig, match, max_removable


def _inputs(seed, n=23, d=8, batch=3):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, n, d, generator=g)
    frozen_at = torch.randint(1, n, (batch,), generator=g)
    frozen = torch.arange(n) == frozen_at[:, None]
    return metric, frozen, frozen_at


@pytest.mark.parametrize("method, variant", [("pitome", "plain"), ("pitome", "text"), ("pitome", "bsm-early"), ("crossget", "plain")])
@pytest.mark.parametrize("seed", range(5))
def test_freezing_equals_removing_then_appending(method, variant, seed):
    cfg = MethodConfig(name=method, pitome_variant=variant)
    metric, frozen, frozen_at = _inputs(seed)
    n, r = metric.shape[1], 6
    plan = match(cfg, metric, r, protected=1, layer=1, num_layers=4, frozen=frozen)
    for b in range(metric.shape[0]):
        keep = torch.arange(n) != frozen_at[b]
        rest = match(cfg, metric[b : b + 1, keep], r, protected=1, layer=1, num_layers=4)
        expected = torch.empty(n, dtype=torch.int64)
        expected[keep] = rest.dst_slot[0]
        expected[frozen_at[b]] = n - r - 1
        assert torch.equal(plan.dst_slot[b], expected)


@pytest.mark.parametrize("method", ["tome", "turbo"])
@pytest.mark.parametrize("seed", range(5))
def test_frozen_token_is_alone_in_the_last_slot(method, seed):
    metric, frozen, frozen_at = _inputs(seed)
    n, r = metric.shape[1], 9  # (23 - 1 - 1) // 2 = 10 is the most with a frozen token
    cls_attn = torch.rand(metric.shape[:2], generator=torch.Generator().manual_seed(seed))
    plan = match(MethodConfig(name=method), metric, r, protected=1, cls_attn=cls_attn, frozen=frozen)
    for b in range(metric.shape[0]):
        slots = plan.dst_slot[b]
        assert slots[frozen_at[b]] == n - r - 1
        assert int((slots == n - r - 1).sum()) == 1
        assert sorted(set(slots.tolist())) == list(range(n - r))
        assert slots[0] == 0


def test_frozen_tokens_lower_the_per_layer_limit():
    metric, frozen, _ = _inputs(0)
    with pytest.raises(ValueError, match="at most 10"):
        match(MethodConfig(name="tome"), metric, 11, protected=1, frozen=frozen)


@pytest.mark.parametrize("method", ["tome", "turbo"])
def test_at_the_limit_the_frozen_token_stays_alone_wherever_it_sits(method):
    """ToMe's A set is the free even positions, and the frozen token may take one of them, so the
    limit is one below their count: at N 6 with a leading token, 1 and not (6 - 2) // 2 = 2 (with 2,
    an EOS at position 2 left A one token short and shared its slot with a B token)."""
    assert max_removable(method, 6, 2, frozen=True) == 1 and max_removable(method, 6, 2) == 2
    for n in range(5, 15):  # from 5 on the limit is at least 1
        r = max_removable(method, n, 2, frozen=True)
        metric = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(n))
        cls_attn = torch.rand(1, n, generator=torch.Generator().manual_seed(n))
        for at in range(1, n):
            frozen = (torch.arange(n) == at)[None]
            slots = match(MethodConfig(name=method), metric, r, protected=1, cls_attn=cls_attn, frozen=frozen).dst_slot[0]
            assert slots[at] == n - r - 1 and int((slots == n - r - 1).sum()) == 1, (n, at, slots)
            assert sorted(set(slots.tolist())) == list(range(n - r)), (n, at, slots)
