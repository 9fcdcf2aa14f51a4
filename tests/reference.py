"""Independent NumPy reference for the per-layer token merges of tokenfuse.

Written from the project's method spec (docs/methods.md says it in prose) plus the conventions below, without looking at the
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
            if not math.isinf(v):  # +inf marks padding, exact by construction
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

def _layout(protected, groups, n_tokens, frozen=None):
    """Build ``slot`` for the output layout protected + concat(groups) (+ the frozen token last).
    Tokens not listed in any group are sources and get -1 here (filled in by the caller)."""
    slot = -np.ones(n_tokens, dtype=np.int64)
    out = 0
    for i in range(protected):
        slot[i] = out
        out += 1
    for g in groups:
        for i in g:
            slot[i] = out
            out += 1
    if frozen is not None:
        slot[frozen] = out
        out += 1
    return slot, out


def _scores(metric, real):
    """Pair scores: the cosine; with padding (``real`` False), padding/padding pairs are shifted
    above every real pair and padding/real pairs below every real pair."""
    cos = _cos(metric)
    if real is None:
        return cos
    pad = ~np.asarray(real, dtype=bool)
    both = pad[:, None] & pad[None, :]
    mixed = pad[:, None] ^ pad[None, :]
    return cos + 3.0 * both - 3.0 * mixed


def _free(n, protected, frozen):
    """Positions that may merge: not protected, not the frozen token."""
    return [i for i in range(protected, n) if i != frozen]


def _plan_bipartite_positional(metric, r, protected, extra_key, info, real=None, frozen=None):
    """ToMe / Turbo: A = even positions >= protected, B = odd positions >= protected (the frozen
    token in neither)."""
    n = metric.shape[0]
    cos = _scores(metric, real)
    a_pos = [i for i in _free(n, protected, frozen) if i % 2 == 0]
    b_pos = [i for i in _free(n, protected, frozen) if i % 2 == 1]
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
    slot, n_out = _layout(protected, [kept_a, b_pos], n, frozen)
    for k in src_idx:
        slot[a_pos[k]] = slot[dest[k]]
    return slot, n_out


def _pitome_energy(cos_tt, m, alpha, gaussian):
    """Energy of each of the T tokens from their T x T cosine matrix (diagonal included): the mean
    over the columns (the counted tokens)."""
    t = cos_tt.shape[1]
    if gaussian:
        f = np.exp(-(((1.0 - cos_tt) / (1.0 - m)) ** 2) / 2.0)
    else:
        # f(s) = s - m for s >= m, alpha * (exp(s - m) - 1) below the margin
        f = np.where(cos_tt >= m, cos_tt - m, alpha * (np.exp(np.minimum(cos_tt - m, 0.0)) - 1.0))
    # exactly rounded row sums: equal multisets of f-values give bit-identical energies
    return np.array([math.fsum(f[i].tolist()) / t for i in range(f.shape[0])])


def _plan_pitome(metric, r, protected, layer, num_layers, margin, alpha, variant, info, real=None, frozen=None):
    n = metric.shape[0]
    cos = _scores(metric, real)
    pos = _free(n, protected, frozen)  # the T tokens that may merge
    m = margin - margin * layer / num_layers
    if real is None:
        energy = _pitome_energy(cos[np.ix_(pos, pos)], m, alpha, gaussian=(variant == "text"))
    else:  # energy over the real tokens only; padding is the most mergeable (+inf)
        counted = [j for j in pos if real[j]]
        inner = _pitome_energy(_cos(metric)[np.ix_(pos, counted)], m, alpha, gaussian=(variant == "text"))
        energy = np.where(np.asarray(real)[pos], inner, np.inf)
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
        slot, n_out = _layout(protected, [kept_a, b_list], n, frozen)
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
    slot, n_out = _layout(protected, [rest, b_list], n, frozen)
    for i in a_list:
        row = cos[i, b_list]
        k = _argmax_lowest_position(row, b_list)
        info.gap_argmax(row)
        slot[i] = slot[b_list[k]]
    return slot, n_out


def _plan_crossget(metric, r, protected, info, real=None, frozen=None):
    n = metric.shape[0]
    cos = _scores(metric, real)
    S = cos.copy()
    S[np.arange(n), np.arange(n)] = -np.inf
    S[:protected, :] = -np.inf
    S[:, :protected] = -np.inf
    if frozen is not None:
        S[frozen, :] = -np.inf
        S[:, frozen] = -np.inf
    pos = np.array(_free(n, protected, frozen))   # tokens that may merge
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
    slot, n_out = _layout(protected, [dst], n, frozen)
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
                   turbo_beta=1.0, turbo_gamma=0.0, valid=None, frozen=None, return_info=False):
    """Slot assignment only: returns ``slot`` int64 [B, N] (output slot of every input token).
    With ``return_info=True`` also returns a dict with ``min_gap`` (smallest non-zero margin of
    any decision; only meaningful below 1e-4) and ``inexact_tie`` (see :class:`_Info`).

    ``valid`` ([B, N] bool, False = padding): padding pairs with padding first and with real
    tokens last, is never counted in a real token's PiToMe energy and is the most mergeable.
    ``frozen`` ([B, N] bool, at most one per row): a token that never merges and takes the last slot."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if method == "pitome" and pitome_variant not in PITOME_VARIANTS:
        raise ValueError(f"unknown pitome variant {pitome_variant!r}")
    metric = np.asarray(metric, dtype=np.float64)
    bsz, n, _ = metric.shape
    info = _Info()
    slots = np.empty((bsz, n), dtype=np.int64)
    for b in range(bsz):
        real = None if valid is None else np.asarray(valid[b], dtype=bool)
        hold = None if frozen is None or not np.any(frozen[b]) else int(np.flatnonzero(frozen[b])[0])
        extras = dict(real=real, frozen=hold)
        if r == 0:
            slot, n_out = np.arange(n, dtype=np.int64), n
        elif method == "tome":
            slot, n_out = _plan_bipartite_positional(metric[b], r, protected, None, info, **extras)
        elif method == "turbo":
            if cls_attn is None:
                raise ValueError("turbo needs cls_attn")
            a_prime = turbo_beta ** abs(turbo_gamma - layer) * turbo_alpha * 30
            extra = a_prime * np.asarray(cls_attn, dtype=np.float64)[b]
            slot, n_out = _plan_bipartite_positional(metric[b], r, protected, extra, info, **extras)
        elif method == "pitome":
            slot, n_out = _plan_pitome(metric[b], r, protected, layer, num_layers, margin, alpha,
                                       pitome_variant, info, **extras)
        else:
            slot, n_out = _plan_crossget(metric[b], r, protected, info, **extras)
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


# --------------------------------------------------------------------------------------------
# the whole merged encoder: transformer blocks with the merge after the attention residual
# --------------------------------------------------------------------------------------------
#
# Written from the spec ("Where merging happens in a block", "Proportional attention", "The shared
# merge") and docs/methods.md's conventions for padding (text encoders) and the frozen EOS token of
# CLIP text. Weights come in as plain NumPy arrays in PyTorch's Linear layout ([out, in]); a layer
# is a dict with q/k/v/o/fc1/fc2 weights and biases, ln1/ln2 (weight, bias, eps), `heads`, `act`
# and `post_norm` (BERT: norms after each residual; ViT/CLIP: norms before each branch).

SQRT_HALF = 1.0 / math.sqrt(2.0)


def layer_norm(x, norm):
    weight, bias, eps = norm
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def activation(x, kind):
    if kind == "gelu":  # exact (erf) GELU
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x * SQRT_HALF))
    if kind == "quick_gelu":  # OpenAI CLIP
        return x / (1.0 + np.exp(-1.702 * x))
    raise ValueError(f"unknown activation {kind!r}")


def linear(x, weight, bias):
    return x @ weight.T + bias


def _heads(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)  # [B,H,N,d]


def attention(h, layer, size, prop_attn, valid, positions, pool):
    """Softmax attention; the key logits get log(size) (proportional attention), padding keys and
    (causal models) keys at later positions are masked out. Also returns the pooling token's row
    of the probabilities averaged over heads (``pool``: [B] query index)."""
    heads = layer["heads"]
    q, k, v = (_heads(linear(h, layer[f"{p}_w"], layer[f"{p}_b"]), heads) for p in "qkv")
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])  # [B,H,N,N]
    if prop_attn:
        logits = logits + np.log(size[:, None, None, :, 0])
    if valid is not None:
        logits = np.where(valid[:, None, None, :], logits, -np.inf)
    if positions is not None:
        later = positions[:, None, :] > positions[:, :, None]  # key later than query
        logits = np.where(later[:, None], -np.inf, logits)
    logits = logits - logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(h.shape)
    rows = probs[np.arange(len(pool)), :, pool].mean(1)  # [B,N]
    return linear(out, layer["o_w"], layer["o_b"]), k.mean(1), rows


def merge_tokens(x, size, slots, n_out, valid=None, positions=None):
    """The shared merge: each slot is the size-weighted mean of its members and its size their sum.
    With padding, a slot holding a real token averages (and counts) its real members only, and a
    slot of padding alone stays padding. A slot's causal position is its latest member's."""
    bsz, _, c = x.shape
    x_out, s_out = np.zeros((bsz, n_out, c)), np.zeros((bsz, n_out, 1))
    v_out = np.zeros((bsz, n_out), dtype=bool)
    p_out = None if positions is None else np.full((bsz, n_out), -np.inf)
    for b in range(bsz):
        for slot in range(n_out):
            members = np.flatnonzero(slots[b] == slot)
            real = members if valid is None else members[valid[b, members]]
            v_out[b, slot] = len(real) > 0
            use = real if len(real) else members
            w = size[b, use, 0]
            x_out[b, slot] = (w[:, None] * x[b, use]).sum(0) / w.sum()
            s_out[b, slot, 0] = w.sum()
            if positions is not None:
                p_out[b, slot] = positions[b, members].max()
    return x_out, s_out, (None if valid is None else v_out), p_out


def reference_encoder(x, layers, schedule, *, method="none", protected=1, prop_attn=True,
                      metric="keys", valid=None, positions=None, frozen=None, **method_kw):
    """Run the blocks with merging. ``x`` [B,N,C] embedded tokens (float64); ``schedule`` the tokens
    leaving each layer. Returns x, size, valid, frozen and the smallest decision gap (see
    ``reference_plan``) plus whether any tie was inexact."""
    x = np.asarray(x, dtype=np.float64)
    bsz, n, _ = x.shape
    size = np.ones((bsz, n, 1))
    gap, inexact = math.inf, False
    for index, layer in enumerate(layers):
        pool = np.zeros(bsz, dtype=np.int64) if frozen is None else np.argmax(frozen, axis=1)
        h = x if layer["post_norm"] else layer_norm(x, layer["ln1"])
        out, keys, pool_row = attention(h, layer, size, prop_attn, valid, positions, pool)
        x = x + out
        if layer["post_norm"]:
            x = layer_norm(x, layer["ln1"])
        n_in, n_out = x.shape[1], schedule[index]
        if n_out < n_in:
            slots, info = reference_plan(
                method, keys if metric == "keys" else x, n_in - n_out, protected=protected, layer=index,
                num_layers=len(layers), cls_attn=pool_row, valid=valid, frozen=frozen, return_info=True, **method_kw)
            gap, inexact = min(gap, info["min_gap"]), inexact or info["inexact_tie"]
            x, size, valid, positions = merge_tokens(x, size, slots, n_out, valid, positions)
            if frozen is not None:
                frozen = np.zeros((bsz, n_out), dtype=bool)
                frozen[:, -1] = True
        h = x if layer["post_norm"] else layer_norm(x, layer["ln2"])
        x = x + linear(activation(linear(h, layer["fc1_w"], layer["fc1_b"]), layer["act"]), layer["fc2_w"], layer["fc2_b"])
        if layer["post_norm"]:
            x = layer_norm(x, layer["ln2"])
    return {"x": x, "size": size, "valid": valid, "frozen": frozen, "min_gap": gap, "inexact_tie": inexact}


def weighted_mean(x, size, keep=None):
    """Pooling that a merge preserves: the mean over tokens weighted by size (and `keep`)."""
    w = size[..., 0] if keep is None else size[..., 0] * keep
    return (x * w[..., None]).sum(1) / w.sum(1, keepdims=True)
