"""Independent NumPy reference for the per-layer token merges of tokenfuse.

Written from ``shared/spec/algorithms.md`` plus the conventions below, without looking at the
production code (``tokenfuse.exporter.methods``). It is deliberately plain: float64, one Python
loop per batch element, explicit index bookkeeping. Speed does not matter here, clarity does.

Conventions (what the spec leaves open):

* The first ``protected`` tokens are never sources nor destinations; they come out first, in order.
* Every ranking is a STABLE descending sort (equal values keep the lower position first); every
  argmax picks the lowest index among equal maxima (for PiToMe/BSM/CrossGET destinations: the
  lowest *position* among tied destinations).
* Shared merge: each output token is the size-weighted mean of the inputs assigned to it, and its
  size is the sum of their sizes.
* ``r == 0`` returns the input unchanged (identity, original order).

Sums that decide a ranking (PiToMe energies) are taken with ``math.fsum`` so that equal multisets
give bit-identical energies regardless of summation order.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["reference_merge", "reference_plan", "apply_slots"]

METHODS = ("tome", "pitome", "crossget", "turbo")
PITOME_VARIANTS = ("plain", "bsm-early", "text")


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _cos(metric: np.ndarray) -> np.ndarray:
    """Cosine-similarity matrix of the rows of ``metric`` ([N, D] -> [N, N]), float64."""
    m = np.asarray(metric, dtype=np.float64)
    norm = np.sqrt(np.sum(m * m, axis=-1, keepdims=True))
    mn = m / norm
    c = mn @ mn.T
    # exactly symmetric, so that e.g. mutual nearest neighbours tie exactly (as in exact math)
    return (c + c.T) / 2.0


def _stable_desc(values) -> np.ndarray:
    """Indices that sort ``values`` descending; equal values keep their original (lower) order."""
    v = np.asarray(values, dtype=np.float64)
    # argsort of the negated keys with a stable sort == stable descending sort.
    return np.argsort(-v, kind="stable")


def _argmax_lowest_position(scores, positions) -> int:
    """Index k (into ``scores``) of the maximum; among equal maxima the one with lowest positions[k]."""
    scores = np.asarray(scores, dtype=np.float64)
    cands = np.flatnonzero(scores == scores.max())
    return int(min(cands, key=lambda k: positions[k]))


_NEAR = 1e-4   # redundancy pairs further apart than this are never reported as near-ties


class _Info:
    """Collects how close the data came to flipping a decision (used by the tests to avoid inputs
    on which float32 rounding in the production code could legitimately pick differently)."""

    def __init__(self):
        self.min_gap = math.inf          # smallest non-zero gap between compared keys
        self.inexact_tie = False         # a tie in a *summed* key between non-identical metric rows

    def gap_sorted(self, sorted_vals, only_boundary=None):
        """Record consecutive gaps of an already sorted (descending) key list. With
        ``only_boundary=k`` only the gap between element k-1 and k matters."""
        v = [float(a) for a in sorted_vals]
        if only_boundary is not None:
            k = only_boundary
            pairs = [(k - 1, k)] if 0 < k < len(v) else []
        else:
            pairs = [(i, i + 1) for i in range(len(v) - 1)]
        for i, j in pairs:
            a, b = v[i], v[j]
            if a == b or (math.isinf(a) and math.isinf(b)):
                continue
            g = abs(a - b)
            if g < self.min_gap:
                self.min_gap = g

    def gap_argmax(self, scores):
        s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
        best = s[0]
        below = s[s < best]
        if len(below) and not math.isinf(best):
            g = best - below[0]
            if g < self.min_gap:
                self.min_gap = g

    def check_ties_identical_rows(self, values, idx, metric):
        """Summed keys that tie exactly must belong to identical metric rows (else float32 could
        break the tie either way)."""
        groups = {}
        for v, i in zip(values, idx):
            groups.setdefault(float(v), []).append(i)
        for members in groups.values():
            first = metric[members[0]]
            for i in members[1:]:
                if not np.array_equal(metric[i], first):
                    self.inexact_tie = True
                    return


# --------------------------------------------------------------------------------------------
# per-method plans for ONE batch element: return slot[N] (output slot of each input token)
# --------------------------------------------------------------------------------------------

def _layout(protected, groups, n_tokens):
    """Build ``slot`` for the output layout protected + concat(groups). Tokens not listed in any
    group are sources and get -1 here (filled in by the caller)."""
    slot = -np.ones(n_tokens, dtype=np.int64)
    out = 0
    for i in range(protected):
        slot[i] = out
        out += 1
    for g in groups:
        for i in g:
            slot[i] = out
            out += 1
    return slot, out


def _plan_bipartite_positional(metric, r, protected, extra_key, info):
    """ToMe / Turbo: A = even positions >= protected, B = odd positions >= protected."""
    n = metric.shape[0]
    cos = _cos(metric)
    a_pos = [i for i in range(protected, n) if i % 2 == 0]
    b_pos = [i for i in range(protected, n) if i % 2 == 1]
    best = []
    dest = []
    for i in a_pos:
        row = cos[i, b_pos]
        k = int(np.argmax(row))  # np.argmax -> first (lowest) index; B list is in position order
        best.append(row[k])
        dest.append(b_pos[k])
    key = np.array(best) if extra_key is None else np.array(best) - np.array([extra_key[i] for i in a_pos])
    order = _stable_desc(key)
    info.gap_sorted(key[order], only_boundary=r)
    src_idx = order[:r]
    for k in src_idx:
        i = a_pos[k]
        info.gap_argmax(cos[i, b_pos])
    src = set(a_pos[k] for k in src_idx)
    kept_a = [i for i in a_pos if i not in src]  # positional order
    slot, n_out = _layout(protected, [kept_a, b_pos], n)
    for k in src_idx:
        slot[a_pos[k]] = slot[dest[k]]
    return slot, n_out


def _pitome_energy(cos_tt, m, alpha, gaussian):
    """Energy of each of the T tokens from their T x T cosine matrix (diagonal included)."""
    t = cos_tt.shape[0]
    if gaussian:
        f = np.exp(-(((1.0 - cos_tt) / (1.0 - m)) ** 2) / 2.0)
    else:
        # f(s) = s - m for s >= m, alpha * (exp(s - m) - 1) below the margin
        f = np.where(cos_tt >= m, cos_tt - m, alpha * (np.exp(np.minimum(cos_tt - m, 0.0)) - 1.0))
    # exactly rounded row sums: equal multisets of f-values give bit-identical energies
    return np.array([math.fsum(f[i].tolist()) / t for i in range(t)])


def _plan_pitome(metric, r, protected, layer, num_layers, margin, alpha, variant, info):
    n = metric.shape[0]
    cos = _cos(metric)
    pos = list(range(protected, n))  # the T non-protected tokens
    m = margin - margin * layer / num_layers
    cos_tt = cos[np.ix_(pos, pos)]
    energy = _pitome_energy(cos_tt, m, alpha, gaussian=(variant == "text"))
    rank = _stable_desc(energy)                 # rank k -> index into pos
    ranked = [pos[k] for k in rank]             # absolute positions in energy-rank order
    info.gap_sorted(energy[rank])
    info.check_ties_identical_rows(energy, pos, metric)

    use_bsm = variant == "bsm-early" and layer < num_layers // 2
    if use_bsm:
        a_list = ranked[0::2]                   # energy-rank order
        b_list = ranked[1::2]
        best, dest = [], []
        for i in a_list:
            row = cos[i, b_list]
            k = _argmax_lowest_position(row, b_list)
            best.append(row[k])
            dest.append(b_list[k])
        best = np.array(best)
        order = _stable_desc(best)              # ties -> lower energy rank (a_list is rank-ordered)
        info.gap_sorted(best[order], only_boundary=r)
        src_k = list(order[:r])
        for k in src_k:
            info.gap_argmax(cos[a_list[k], b_list])
        src = set(a_list[k] for k in src_k)
        kept_a = [i for i in a_list if i not in src]    # energy-rank order
        slot, n_out = _layout(protected, [kept_a, b_list], n)
        for k in src_k:
            slot[a_list[k]] = slot[dest[k]]
        return slot, n_out

    if variant == "text":
        a_list = ranked[0:r]
        b_list = ranked[r:2 * r]
    else:  # plain (and bsm-early in the late layers)
        a_list = ranked[0:2 * r:2]
        b_list = ranked[1:2 * r:2]
    rest = ranked[2 * r:]                       # energy-rank order
    slot, n_out = _layout(protected, [rest, b_list], n)
    for i in a_list:
        row = cos[i, b_list]
        k = _argmax_lowest_position(row, b_list)
        info.gap_argmax(row)
        slot[i] = slot[b_list[k]]
    return slot, n_out


def _plan_crossget(metric, r, protected, info):
    n = metric.shape[0]
    cos = _cos(metric)
    S = cos.copy()
    S[np.arange(n), np.arange(n)] = -np.inf
    S[:protected, :] = -np.inf
    S[:, :protected] = -np.inf
    pos = np.arange(protected, n)                 # non-protected tokens
    St = S[np.ix_(pos, pos)]                      # [T, T], diagonal -inf
    t = len(pos)
    redundancy = St.max(axis=1)
    rorder = _stable_desc(redundancy)
    rank = np.empty(t, dtype=np.int64)
    rank[rorder] = np.arange(t)                   # redundancy rank of each non-protected token
    M = np.full(t, -np.inf)
    for k in range(t):
        lower = rank > rank[k]                    # strictly lower ranked (the diagonal is -inf)
        if lower.any():
            M[k] = St[k, lower].max()
    # Near-ties in redundancy only matter when swapping the two tokens' ranks would change a
    # masked max; record the gaps of those pairs only.
    diff = np.abs(redundancy[:, None] - redundancy[None, :])
    for a, b in zip(*np.nonzero((diff > 0) & (diff < _NEAR))):
        if a >= b:
            continue
        for u, v in ((a, b), (b, a)):
            lower = (rank > rank[u])
            lower[v] = False
            without = St[u, lower].max() if lower.any() else -np.inf
            if max(without, St[u, v]) != without:
                info.min_gap = min(info.min_gap, diff[a, b])
                break
    morder = _stable_desc(M)
    info.gap_sorted(M[morder], only_boundary=r)
    src = [int(pos[k]) for k in morder[:r]]
    src_set = set(src)
    dst = [int(i) for i in pos if int(i) not in src_set]   # positional order
    slot, n_out = _layout(protected, [dst], n)
    for i in src:
        row = S[i, dst]
        k = _argmax_lowest_position(row, dst)
        info.gap_argmax(row)
        slot[i] = slot[dst[k]]
    return slot, n_out


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def reference_plan(method, metric, r, *, protected=1, layer=0, num_layers=12, cls_attn=None,
                   margin=0.9, alpha=1.0, pitome_variant="plain", turbo_alpha=1.0,
                   turbo_beta=1.0, turbo_gamma=0.0, return_info=False):
    """Slot assignment only: returns ``slot`` int64 [B, N] (output slot of every input token).
    With ``return_info=True`` also returns a dict with ``min_gap`` (smallest non-zero margin of
    any decision; only meaningful below 1e-4) and ``inexact_tie`` (see :class:`_Info`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if method == "pitome" and pitome_variant not in PITOME_VARIANTS:
        raise ValueError(f"unknown pitome variant {pitome_variant!r}")
    metric = np.asarray(metric, dtype=np.float64)
    bsz, n, _ = metric.shape
    info = _Info()
    slots = np.empty((bsz, n), dtype=np.int64)
    for b in range(bsz):
        if r == 0:
            slot, n_out = np.arange(n, dtype=np.int64), n
        elif method == "tome":
            slot, n_out = _plan_bipartite_positional(metric[b], r, protected, None, info)
        elif method == "turbo":
            if cls_attn is None:
                raise ValueError("turbo needs cls_attn")
            a_prime = turbo_beta ** abs(turbo_gamma - layer) * turbo_alpha * 30
            extra = a_prime * np.asarray(cls_attn, dtype=np.float64)[b]
            slot, n_out = _plan_bipartite_positional(metric[b], r, protected, extra, info)
        elif method == "pitome":
            slot, n_out = _plan_pitome(metric[b], r, protected, layer, num_layers, margin, alpha,
                                       pitome_variant, info)
        else:
            slot, n_out = _plan_crossget(metric[b], r, protected, info)
        assert n_out == n - r, (n_out, n, r)
        assert slot.min() >= 0
        slots[b] = slot
    if return_info:
        return slots, {"min_gap": info.min_gap, "inexact_tie": info.inexact_tie}
    return slots


def apply_slots(x, size, slots, n_out):
    """The shared merge: size-weighted mean of the inputs that share a slot; sizes add."""
    x = np.asarray(x, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    bsz, n, c = x.shape
    x_out = np.zeros((bsz, n_out, c))
    s_out = np.zeros((bsz, n_out, 1))
    for b in range(bsz):
        for i in range(n):
            s = slots[b, i]
            x_out[b, s] += size[b, i, 0] * x[b, i]
            s_out[b, s, 0] += size[b, i, 0]
        x_out[b] /= s_out[b]
    return x_out, s_out


def reference_merge(method, x, metric, size, r, *, protected=1, layer=0, num_layers=12,
                    cls_attn=None, margin=0.9, alpha=1.0, pitome_variant="plain",
                    turbo_alpha=1.0, turbo_beta=1.0, turbo_gamma=0.0):
    """Reference per-layer merge. x [B,N,C], metric [B,N,D], size [B,N,1], cls_attn [B,N] (turbo).
    Returns (x_out [B,N-r,C], size_out [B,N-r,1]) as float64 arrays."""
    x = np.asarray(x, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    n = x.shape[1]
    if r == 0:
        return x.copy(), size.copy()
    slots = reference_plan(method, metric, r, protected=protected, layer=layer,
                           num_layers=num_layers, cls_attn=cls_attn, margin=margin, alpha=alpha,
                           pitome_variant=pitome_variant, turbo_alpha=turbo_alpha,
                           turbo_beta=turbo_beta, turbo_gamma=turbo_gamma)
    return apply_slots(x, size, slots, n - r)
