"""Merge-decision agreement that knows near-ties.

Two runtimes computing the same merge round differently, so where two candidates' scores sit within
rounding of each other they may choose differently, and both choices are right. A runtime's
decision (its slots) is therefore judged on the reference's own scores, from the same layer input:
- a ranking disagrees only where the runtime orders two tokens against the reference and their
  keys differ by more than the tolerance;
- an argmax disagrees only where the partner the runtime chose scores below the best candidate by
  more than the tolerance (the candidates being those the runtime's own excused choices left).
What slots do not show (the order among sources, which member of a merged group is its destination)
is read in the runtime's favour; a token whose slot no such reading explains disagrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .methods import (
    LayerRule,
    bipartite_priority,
    bipartite_slots,
    bsm_sets,
    candidate_bias,
    crossget_key,
    crossget_scores,
    dst_slots,
    pitome_energy,
    pitome_roles,
    place,
    prepare,
    rank_among,
)

Tensor = torch.Tensor


@dataclass
class Decision:
    """One layer's merge inputs and the reference's own slots, kept to judge another runtime's."""

    rule: LayerRule
    metric: Tensor
    r: int
    protected: int
    cls_attn: Tensor | None
    valid: Tensor | None
    frozen: Tensor | None
    slots: Tensor


@dataclass
class Agreement:
    """Token counts: compared, with the reference's slot, and disagreeing beyond the tolerance."""

    tokens: int = 0
    equal: int = 0
    wrong: int = 0

    @property
    def raw(self) -> float:
        """The share of tokens in the reference's slot."""
        return self.equal / self.tokens if self.tokens else 1.0

    @property
    def near_tie_aware(self) -> float:
        """The share of tokens whose slot is right up to near-ties."""
        return 1.0 - self.wrong / self.tokens if self.tokens else 1.0

    @property
    def excused(self) -> int:
        """Tokens in another slot than the reference's because of a near-tie."""
        return self.tokens - self.equal - self.wrong


def judge(decision: Decision, runtime: Tensor, tolerance: float) -> Agreement:
    """How far `runtime`'s slots ([B, N]) agree with the reference's `decision` on the same input."""
    runtime = runtime.to(decision.slots.device, torch.int64)
    equal = runtime == decision.slots
    result = Agreement(tokens=equal.numel(), equal=int(equal.sum()))
    rows = [int(b) for b in torch.nonzero(~equal.all(-1)).flatten()]
    if not rows:
        return result
    d = decision
    explain = _EXPLAINERS.get(d.rule.name)
    if explain is None:  # a method no near-tie is explained for: every differing slot is wrong
        result.wrong = result.tokens - result.equal
        return result
    n = d.metric.shape[1]
    sim, free = prepare(d.metric, d.protected, d.valid, d.frozen)
    free = free.expand(sim.shape[:2])  # [N] when no token is frozen
    keys = _keys(d, sim, free)
    for b in rows:
        row = _Row(sim[b], free[b], runtime[b], d.r, d.protected, tolerance, keys[b] if keys is not None else None)
        wrong, rebuilt = explain(row, d.rule)
        if d.frozen is not None:
            rebuilt = torch.where(d.frozen[b], n - d.r - 1, rebuilt)
        wrong = wrong | (rebuilt != row.runtime)
        result.wrong += int(wrong.sum())
    return result


def _keys(d: Decision, sim: Tensor, free: Tensor) -> Tensor | None:
    """The key a method ranks by that does not depend on the runtime's choices (batched)."""
    if d.rule.name == "pitome":
        return pitome_energy(sim, free, d.rule, d.valid)
    if d.rule.name == "turbo":
        return d.rule.turbo_weight * d.cls_attn.float()  # the penalty on ToMe's priority
    return None


@dataclass
class _Row:
    """One batch element: similarities, free tokens, the runtime's slots and the method's key."""

    sim: Tensor
    free: Tensor
    runtime: Tensor
    r: int
    protected: int
    tolerance: float
    key: Tensor | None

    @property
    def n(self) -> int:
        return self.runtime.shape[0]


def _inverted(key: Tensor, runtime_rank: Tensor, reference_rank: Tensor, members: Tensor, tolerance: float) -> Tensor:
    """Tokens of a pair (both members) that the runtime orders against the reference's descending
    order although the better key leads by more than the tolerance (a non-finite gap never excuses)."""
    both = members.unsqueeze(-1) & members.unsqueeze(-2)
    against = (runtime_rank.unsqueeze(-1) < runtime_rank.unsqueeze(-2)) & (reference_rank.unsqueeze(-1) > reference_rank.unsqueeze(-2))
    lead = key.unsqueeze(-2) - key.unsqueeze(-1)  # [u, v]: how much v, placed after u, is better
    bad = both & against & ~(lead <= tolerance)
    return bad.any(-1) | bad.any(-2)


def _fill(rank: Tensor, tokens: Tensor, ranks: list[int], preference: Tensor) -> None:
    """Give `tokens` the `ranks` in the reference's `preference` (ascending); extra tokens get
    ranks no layout accepts."""
    members = torch.nonzero(tokens).flatten()
    members = members[preference[members].argsort(stable=True)]
    for i, token in enumerate(members.tolist()):
        rank[token] = ranks[i] if i < len(ranks) else 2 * rank.shape[0] + i


def _group_partner(runtime: Tensor, dst: Tensor) -> Tensor:
    """Each token's destination in its slot (-1 where the slot holds none)."""
    same = (runtime.unsqueeze(-1) == runtime.unsqueeze(-2)) & dst.unsqueeze(-2)
    return torch.where(same.any(-1), same.to(torch.int8).argmax(-1), -1)


def _choose_dst(runtime: Tensor, region: Tensor, cost: Tensor) -> Tensor:
    """In each slot of `region`, the member of lowest `cost` (unique among members) is the destination."""
    same = (runtime.unsqueeze(-1) == runtime.unsqueeze(-2)) & region.unsqueeze(-1) & region.unsqueeze(-2)
    return region & ~(same & (cost.unsqueeze(-2) < cost.unsqueeze(-1))).any(-1)


def _partner_wrong(scores: Tensor, sources: Tensor, partner: Tensor, candidates: Tensor, tolerance: float) -> Tensor:
    """Sources whose partner is no candidate or scores below the best candidate by more than the tolerance."""
    best = torch.where(candidates.unsqueeze(-2), scores, -torch.inf).amax(-1)
    index = partner.clamp(min=0)
    chosen = scores.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    right = (partner >= 0) & candidates[index] & (chosen >= best - tolerance)
    return sources & ~right


def _bipartite_row(row: _Row, is_a: Tensor, is_b: Tensor, order: Tensor, penalty: Tensor | None, extra_wrong: Tensor):
    """ToMe's matching between A and B (each ordered by `order`): the runtime's sources are the A
    tokens in B's slots; the top-r choice and each partner are checked."""
    n_kept = int(is_a.sum()) - row.r
    src = is_a & (row.runtime >= row.protected + n_kept)
    priority = bipartite_priority(row.sim, candidate_bias(is_b), penalty)
    reference = rank_among(priority, is_a, descending=True, tiebreak=order)
    rank = torch.full_like(reference, 2 * row.n)
    n_src = int(src.sum())
    _fill(rank, src, list(range(n_src)), reference)
    _fill(rank, is_a & ~src, list(range(n_src, int(is_a.sum()))), reference)
    partner = _group_partner(row.runtime, is_b)
    wrong = extra_wrong | _inverted(priority, rank, reference, is_a, row.tolerance)
    wrong |= _partner_wrong(row.sim, src, partner, is_b, row.tolerance)
    return wrong, place(bipartite_slots(src, is_a, is_b, row.protected, order), src, partner.clamp(min=0))


def _tome_row(row: _Row, rule: LayerRule):
    pos = torch.arange(row.n, device=row.runtime.device)
    is_a, is_b = row.free & (pos % 2 == 0), row.free & (pos % 2 == 1)
    return _bipartite_row(row, is_a, is_b, pos, row.key, torch.zeros_like(is_a))


def _pitome_row(row: _Row, rule: LayerRule):
    """The runtime's energy ranking as far as its slots show it: kept tokens exactly, each merged
    group's destination at its rank, the sources' order completed as the reference orders them (the runtime's favour)."""
    energy, free, runtime, r, protected = row.key, row.free, row.runtime, row.r, row.protected
    reference = rank_among(energy, free, descending=True)
    rank = torch.full_like(reference, 2 * row.n)
    n_free = int(free.sum())
    if rule.variant == "bsm":
        start = protected + (n_free + 1) // 2 - r  # B's slots follow the protected and kept A tokens
        region = free & (runtime >= start)
        target = 2 * (runtime - start) + 1  # the j-th B token has rank 2j + 1
        is_b = _pitome_destinations(row, region, target, energy, reference)
        rank = torch.where(is_b, target, rank)
        _rank_bsm_sources(rank, free & ~is_b, runtime, start, reference)
    else:
        start = protected + n_free - 2 * r  # the kept tokens' slots come first
        kept = free & (runtime < start)
        rank = torch.where(kept, runtime - protected + 2 * r, rank)
        region = free & ~kept
        j = runtime - start
        target = r + j if rule.variant == "text" else 2 * j + 1
        is_b = _pitome_destinations(row, region, target, energy, reference)
        rank = torch.where(is_b, target, rank)
        _fill(rank, region & ~is_b, list(range(r)) if rule.variant == "text" else list(range(0, 2 * r, 2)), reference)
    wrong = _inverted(energy, rank, reference, free, row.tolerance)
    if rule.variant == "bsm":
        return _bipartite_row(row, *bsm_sets(rank, free), rank, None, wrong)
    rank = torch.where(free, rank, n_free + (~free).cumsum(-1) - 1)  # the others after the free, in position order
    rank = rank.clamp(0, row.n - 1)
    slot, is_a, is_b = (table[rank] for table in pitome_roles(row.n, n_free, r, protected, rule.variant, rank.device))
    partner = _group_partner(runtime, is_b)
    wrong |= _partner_wrong(row.sim, is_a, partner, is_b, row.tolerance)
    return wrong, place(slot, is_a, partner.clamp(min=0))


def _pitome_destinations(row: _Row, region: Tensor, target: Tensor, energy: Tensor, reference: Tensor) -> Tensor:
    """Which member of each merged group is its destination (B): first the member the reference
    ranks nearest to B's rank, then, group by group, the member with the fewest checks failing
    (its energy against the reference's at that rank; the others' partner scores)."""
    cost = (reference - target).abs() * (2 * row.n) + reference
    is_b = _choose_dst(row.runtime, region, cost)
    ordered = energy[row.free].sort(descending=True).values
    at_rank = ordered[target.clamp(0, len(ordered) - 1)]
    misranked = ~((energy - at_rank).abs() <= row.tolerance) | (target >= len(ordered))
    for slot in row.runtime[region].unique().tolist():
        members = torch.nonzero(region & (row.runtime == slot)).flatten()
        if len(members) < 2:
            continue
        others = is_b.clone()
        others[members] = False

        def failures(candidate: int) -> tuple[int, int]:
            best = torch.where(others, row.sim[members], -torch.inf).amax(-1).maximum(row.sim[members, candidate])
            weak = (row.sim[members, candidate] < best - row.tolerance) & (members != candidate)
            return int(weak.sum()) + int(misranked[candidate]), int(cost[candidate])

        chosen = min(members.tolist(), key=failures)
        is_b[members] = members == chosen
    return is_b


def _rank_bsm_sources(rank: Tensor, is_a: Tensor, runtime: Tensor, start: int, reference: Tensor) -> None:
    """PiToMe-BSM's A tokens take the even ranks: the kept ones in their slots' order, the sources
    (in B's slots, order unseen) merged in by the reference's order."""
    kept = [int(t) for t in torch.nonzero(is_a & (runtime < start)).flatten()]
    kept.sort(key=lambda t: int(runtime[t]))
    sources = [int(t) for t in torch.nonzero(is_a & (runtime >= start)).flatten()]
    sources.sort(key=lambda t: int(reference[t]))
    merged = []
    while kept or sources:
        take_kept = kept and (not sources or int(reference[kept[0]]) <= int(reference[sources[0]]))
        merged.append((kept if take_kept else sources).pop(0))
    for i, token in enumerate(merged):
        rank[token] = 2 * i


def _crossget_dst(runtime: Tensor, free: Tensor, key_rank: Tensor) -> Tensor:
    """Each slot's destination: destinations sit in position order, so slot s's lies after slot
    s-1's and before the last member of slot s+1; among those members, the one the reference
    ranks last as a source."""
    groups: dict[int, list[int]] = {}
    for token in torch.nonzero(free).flatten().tolist():
        groups.setdefault(int(runtime[token]), []).append(token)
    dst, previous = torch.zeros_like(free), -1
    order = sorted(groups)
    for i, slot in enumerate(order):
        limit = max(groups[order[i + 1]]) if i + 1 < len(order) else runtime.shape[0]
        fits = [t for t in groups[slot] if previous < t < limit] or [t for t in groups[slot] if t > previous] or groups[slot]
        previous = max(fits, key=lambda t: int(key_rank[t]))
        dst[previous] = True
    return dst


def _crossget_row(row: _Row, rule: LayerRule):
    """CrossGET's sources rank by their best similarity to a lower-redundancy token; a token whose
    redundancy is within the tolerance of another's may count that one as lower (or not), read in
    the runtime's favour."""
    free, runtime = row.free, row.runtime
    scores = crossget_scores(row.sim, free)
    redundancy = scores.amax(-1)
    redundancy_rank = rank_among(redundancy, free, descending=True)
    ranked_lower = redundancy_rank.unsqueeze(-2) > redundancy_rank.unsqueeze(-1)
    near = (redundancy.unsqueeze(-2) - redundancy.unsqueeze(-1)).abs() <= row.tolerance
    key_rank = rank_among(crossget_key(scores, ranked_lower), free, descending=True)
    dst = _crossget_dst(runtime, free, key_rank)
    src = free & ~dst
    key = torch.where(src, crossget_key(scores, ranked_lower | near), crossget_key(scores, ranked_lower & ~near))
    reference = rank_among(key, free, descending=True)
    rank = torch.full_like(reference, 2 * row.n)
    n_src = int(src.sum())
    _fill(rank, src, list(range(n_src)), reference)
    _fill(rank, dst, list(range(n_src, int(free.sum()))), reference)
    partner = _group_partner(runtime, dst)
    wrong = _inverted(key, rank, reference, free, row.tolerance)
    wrong |= _partner_wrong(scores, src, partner, dst, row.tolerance)
    return wrong, place(dst_slots(dst, row.protected), src, partner.clamp(min=0))


_EXPLAINERS = {"tome": _tome_row, "turbo": _tome_row, "pitome": _pitome_row, "crossget": _crossget_row}
