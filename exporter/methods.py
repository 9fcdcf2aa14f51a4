"""Token-merging methods: from the similarity metric, decide which tokens merge into which.

Every method returns a `TokenMerge`: the output slot of each input token (`dst_slot`, [B, N]) and
the number of slots K = N - r, which depends only on N and r, never on the data. The decision is
made with ranks computed by pairwise comparison instead of a sort, so the whole matching exports
to ONNX as Greater/Equal/ReduceSum/ArgMax/GatherElements/Where, all of which TensorRT imports
natively, and ties resolve the same way everywhere (the lower position first).

Conventions shared by all methods (see README "Methods"):
- the first `protected` tokens (CLS, distillation token) are never a source or a destination
  and come out first, in order;
- every ranking is a stable descending sort (ties: lower position, or lower `tiebreak` key);
- every argmax picks the lowest index among equal maxima.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Knob, MergeMethod, get_method, method_names, register

# The plugin kernels' PitomeVariant codes (similarityEnergyMergeKernels.h; a test reads the header and
# checks them, the registry's method codes and the constants below against the C++ sources).
KERNEL_VARIANT_CODES = {"plain": 0, "bsm": 1, "text": 2}

# Larger than any score derived from a cosine; finite so fp16 and ONNX stay NaN-free.
BIG = 1e4
# The similarity of a token whose metric is not finite (NaN or Inf, so its unit row is NaN): lower
# than every cosine and above -BIG (masked pairs), so such a token merges last, never by accident,
# and every ranking stays a permutation. The plugin's kernels use the same value.
NON_FINITE_SIMILARITY = -2.0
# With an attention mask, padding/padding pairs look more similar than any real pair and
# padding/real pairs less similar than any real pair: padding merges with padding first.
PAD_BONUS = 4.0
MIXED_PENALTY = 8.0
ROW_ALIGN = 16  # row_sum pads rows to a multiple of 16 fp32 values (64 bytes, the widest SIMD vector)
PADDING_WEIGHT = 1e-6  # a padding token's weight inside a slot that holds real tokens


class MethodConfig:
    """A merge method and its knob values (the method's defaults, the papers', for those not
    given). Knobs of other methods are ignored, so one set of options serves any method."""

    def __init__(self, name: str = "pitome", **knobs):
        self.spec = get_method(name)
        self.name = name
        own = {knob.name: knob for knob in self.spec.knobs}
        self.knobs = {key: own[key].parse(knobs.get(key, own[key].default)) for key in own}
        self.__dict__.update(self.knobs)  # plain attributes, which torch.compile reads like any other

    def __eq__(self, other):
        return isinstance(other, MethodConfig) and (self.name, self.knobs) == (other.name, other.knobs)

    def __hash__(self):
        return hash((self.name, tuple(self.knobs.items())))

    def __repr__(self):
        return f"MethodConfig({self.name!r}{''.join(f', {k}={v!r}' for k, v in self.knobs.items())})"

    def for_model(self, is_text: bool) -> "MethodConfig":
        """The knobs made concrete for a text or vision model (PiToMe's variant "auto")."""
        return MethodConfig(self.name, **self.spec.for_model(dict(self.knobs), is_text))

    def for_layer(self, layer: int, num_layers: int) -> "LayerRule":
        """The knobs of one layer's merge, with the layer-dependent ones worked out."""
        return LayerRule(self.name, **self.spec.layer_rule(self.knobs, layer, num_layers))

    def merges(self, tokens_in: int) -> bool:
        """Whether a layer with `tokens_in` input tokens merges at all."""
        return self.spec.merges(self.knobs, tokens_in)


class LayerRule:
    """One layer's merge rule: the method and its per-layer values (the method's `rule_defaults`
    for those not given). With K and the protected count it is a SimilarityEnergyMerge node."""

    def __init__(self, name: str, **values):
        defaults = get_method(name).rule_defaults
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise TypeError(f"a {name} layer rule has no {', '.join(unknown)} (it has: {', '.join(defaults) or 'nothing'})")
        merged = {**defaults, **values}
        for key, value in {**merged, "name": name, "values": merged}.items():  # plain attributes, as torch.compile wants them
            object.__setattr__(self, key, value)

    def __setattr__(self, key, value):
        raise AttributeError("a LayerRule is immutable; use replace()")

    def replace(self, **changes) -> "LayerRule":
        return LayerRule(self.name, **{**self.values, **changes})

    def __eq__(self, other):
        return isinstance(other, LayerRule) and (self.name, self.values) == (other.name, other.values)

    def __hash__(self):
        return hash((self.name, tuple(sorted(self.values.items()))))

    def __repr__(self):
        return f"LayerRule({self.name!r}{''.join(f', {k}={v!r}' for k, v in self.values.items())})"


def token_count(t: torch.Tensor, axis: int = -1) -> int:
    """A token count as a Python int. Every merging graph has static token counts, so reading
    them this way makes the trace write constants instead of Shape/Gather/Range nodes."""
    return int(t.shape[axis])


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, with no Cast node in the graph when it already is (the exporter writes one
    for a same-type `.to()`, and ONNX Runtime runs it as a copy)."""
    return t if t.dtype == dtype else t.to(dtype)


def fp32(t: torch.Tensor) -> torch.Tensor:
    return cast(t, torch.float32)


def positions(t: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """0, 1, ..., N-1 along `axis` of `t` (a constant in the exported graph)."""
    return torch.arange(token_count(t, axis), device=t.device)


class TokenMerge:
    """A merge decision: input token i goes to output slot `dst_slot[b, i]` of `num_out` slots."""

    def __init__(self, dst_slot: torch.Tensor, num_out: int, identity: bool = False):
        self.dst_slot = dst_slot
        self.num_out = num_out
        self.identity = identity

    @classmethod
    def keep_all(cls, metric: torch.Tensor) -> "TokenMerge":
        n = token_count(metric, 1)
        return cls(positions(metric, 1).expand(metric.shape[0], n), n, identity=True)

    def _assignment(self, dtype) -> torch.Tensor:
        """[B, K, N] one-hot: row k selects the input tokens merged into slot k."""
        slots = torch.arange(self.num_out, device=self.dst_slot.device)
        return (self.dst_slot.unsqueeze(-2) == slots.unsqueeze(-1)).to(dtype)

    def merge(self, x: torch.Tensor, size: torch.Tensor):
        """Size-weighted mean of the tokens sharing a slot (in fp32); sizes (fp32) add up."""
        if self.identity:
            return x, size
        assign = self._assignment(size.dtype)
        new_size = assign @ size
        return cast((assign @ (fp32(x) * size)) / new_size, x.dtype), new_size

    def merge_padded(self, x: torch.Tensor, size: torch.Tensor, valid: torch.Tensor):
        """Merge with an attention mask (`valid` [B, N] bool, False = padding).

        Padding never contributes to a real token: it weighs 1e-6 of a real token inside a slot
        that holds real tokens, and such a slot counts only its real tokens' sizes. A slot of
        padding alone is padding's size-weighted mean and stays padding.
        """
        if self.identity:
            return x, size, valid
        assign = self._assignment(size.dtype)
        real = valid.unsqueeze(-1)
        weight = size * torch.where(real, 1.0, PADDING_WEIGHT)
        real_size = assign @ torch.where(real, size, 0.0)
        holds_real = real_size > 0
        new_size = torch.where(holds_real, real_size, assign @ size)
        return cast((assign @ (fp32(x) * weight)) / (assign @ weight), x.dtype), new_size, holds_real.reshape(-1, self.num_out)

    def apply(self, x: torch.Tensor, size: torch.Tensor, valid: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """The token state after the merge: x, sizes, and the padding mask and causal positions
        where the model has them (None where not). Every path that merges calls this."""
        if valid is None:
            x, size = self.merge(x, size)
        else:
            x, size, valid = self.merge_padded(x, size, valid)
        return x, size, valid, None if positions is None else self.merge_positions(positions)

    def merge_sums(self, t: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-slot sums of `t` ([B, N], fp32); with padding (`valid`), a slot holding real tokens
        sums only theirs, as its size counts only theirs."""
        if self.identity:
            return t
        assign = self._assignment(t.dtype)
        total = (assign @ t.unsqueeze(-1))[..., 0]
        if valid is None:
            return total
        real = valid.to(t.dtype)
        real_sum = (assign @ (t * real).unsqueeze(-1))[..., 0]
        return torch.where((assign @ real.unsqueeze(-1))[..., 0] > 0, real_sum, total)

    def merge_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """A slot's causal position is its latest member's, so no query sees a later token."""
        if self.identity:
            return positions
        member = self._assignment(torch.bool)
        return torch.where(member, positions.unsqueeze(-2), -BIG).amax(-1)


def cosine_similarity(metric: torch.Tensor) -> torch.Tensor:
    """Exactly symmetric (a matmul alone may differ by an ulp between (i, j) and (j, i)); pairs
    with a non-finite metric row get NON_FINITE_SIMILARITY instead of NaN."""
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize, without its Expand node
    sim = unit @ unit.transpose(-1, -2)
    sim = (sim + sim.transpose(-1, -2)) * 0.5
    return torch.where(torch.isnan(sim), NON_FINITE_SIMILARITY, sim)


def separate_padding(sim: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Shift pair scores so padding pairs with padding first and with real tokens last.

    The shift is PAD_BONUS for two padding tokens, -MIXED_PENALTY for a mixed pair and 0 for two
    real ones: with p_j = 1 for padding, factor_i * p_j + own_i, from [B, N] tables (small
    integers, exact in fp32), so the [B, N, N] work is a Mul and two Adds instead of a Where."""
    if valid is None:
        return sim
    pad = torch.where(valid, 0.0, 1.0)
    factor = torch.where(valid, -MIXED_PENALTY, PAD_BONUS + MIXED_PENALTY)
    own = torch.where(valid, 0.0, -MIXED_PENALTY)
    return sim + (factor.unsqueeze(-1) * pad.unsqueeze(-2) + own.unsqueeze(-1))


def rank_among(key: torch.Tensor, members: torch.Tensor, descending: bool, tiebreak=None) -> torch.Tensor:
    """Position of each token among `members` ordered by `key` ([B, N]); ties: smaller tiebreak.

    The default tiebreak is the token position; `members` None means every token. Values for
    non-members are meaningless.
    """
    if tiebreak is None:
        tiebreak = positions(key)
    k_i, k_j = key.unsqueeze(-1), key.unsqueeze(-2)
    t_i, t_j = tiebreak.unsqueeze(-1), tiebreak.unsqueeze(-2)
    ahead = ((k_j > k_i) if descending else (k_j < k_i)) | ((k_j == k_i) & (t_j < t_i))
    if members is not None:
        ahead = ahead & members.unsqueeze(-2)
    return ahead.sum(-1)


def candidate_bias(candidates):
    """0 for the candidates, -BIG for the others ([B, N] or [N]): added to rows of scores, a max
    or argmax sees only the candidates. (One Add: a [B, N, N] Where costs ONNX Runtime's CPU ~20x as much.)"""
    return torch.where(candidates, 0.0, -BIG)


def best_partner(sim, bias):
    """Each token's most similar candidate (`bias` from candidate_bias; the lowest index among equal maxima)."""
    return (sim + bias.unsqueeze(-2)).argmax(-1)


def place(slot, sources, partner):
    """Each source takes the slot of its partner."""
    return torch.where(sources, slot.gather(-1, partner), slot)


def _absorb(slot, sim, sources, destination_bias):
    """Each source takes the slot of its most similar destination."""
    return place(slot, sources, best_partner(sim, destination_bias))


def bipartite_priority(sim, b_bias, penalty=None):
    """ToMe's key for an A token: its best similarity to B (`b_bias` from candidate_bias; minus Turbo's `penalty`)."""
    best = (sim + b_bias.unsqueeze(-2)).amax(-1)
    return best if penalty is None else best - penalty


def bipartite_slots(src, is_a, is_b, protected, order):
    """Slots before the sources move: protected tokens, kept A tokens, then B tokens, each set in `order`."""
    pos = positions(src)
    kept = is_a & ~src
    n_kept = kept.to(torch.int64).sum(-1, keepdim=True)
    slot = torch.where(
        kept,
        protected + rank_among(order, kept, descending=False),
        protected + n_kept + rank_among(order, is_b, descending=False),
    )
    return torch.where(pos < protected, pos, slot)


def bipartite_match(sim, r, protected, is_a, is_b, order, penalty=None):
    """ToMe's soft matching between sets A and B; `order` orders each set in the output.

    The r A tokens whose best match in B is strongest (minus `penalty`) merge into it.
    Output: protected tokens, kept A tokens, then B tokens.
    """
    b_bias = candidate_bias(is_b)
    src = is_a & (rank_among(bipartite_priority(sim, b_bias, penalty), is_a, descending=True, tiebreak=order) < r)
    return _absorb(bipartite_slots(src, is_a, is_b, protected, order), sim, src, b_bias)


def _tome(sim, r, protected, free, penalty=None):
    pos = positions(sim)
    is_a = free & (pos % 2 == 0)
    is_b = free & (pos % 2 == 1)
    return bipartite_match(sim, r, protected, is_a, is_b, pos, penalty)


def row_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of `t`, equal for equal rows. Runtimes vectorise a reduction from a
    row's first aligned element, so rows starting at different alignments add in different orders
    (an ulp apart, and an exact tie would no longer break by position); zero-padding every row to a
    multiple of 64 bytes gives them all one alignment. (A MatMul with a weights vector is no
    better: PyTorch's CPU GEMV differs between equal rows.)"""
    return F.pad(t, (0, -token_count(t) % ROW_ALIGN)).sum(-1)


def pitome_energy(sim, free, rule, valid):
    """PiToMe's energy of each token over the free (real) tokens. The tokens not counted get
    constants: padding BIG (it sorts first), the tokens that are not free -inf (they rank last)."""
    margin = rule.margin
    if rule.variant == "text":
        distance = 1.0 - sim
        affinity = torch.exp(distance * distance * (-0.5 / (1.0 - margin) ** 2))
    else:
        affinity = F.elu(sim - margin, alpha=rule.alpha)
    counted = free if valid is None else free & valid
    weights = counted.to(sim.dtype)  # a constant without padding
    energy = row_sum(affinity * weights.unsqueeze(-2)) / weights.sum(-1, keepdim=True)  # sums first: equal multisets of exact values tie
    return torch.where(counted, energy, torch.where(free, BIG, -torch.inf))


def pitome_roles(n, n_free, r, protected, variant, device=None):
    """Each energy rank's slot before the sources move, and whether it is a source (A) or a
    destination (B): three [n] tables, indexed by the data's ranks.

    Ranks 0 .. n_free-1 are the free tokens'; the others rank after them in position order
    (protected tokens first). Which rank is A, B or kept, and the slot of each rank, depend only on
    the budget, so in a graph the tables are constants and each lookup one Gather. Mergeable ranks
    alternate A, B (A = the top r and B the next r for text); the output is the protected tokens,
    the kept ones by rank, then B by rank."""
    by_rank = torch.arange(n, device=device)
    mergeable = by_rank < 2 * r
    is_b = mergeable & (by_rank >= r if variant == "text" else by_rank % 2 == 1)
    kept_count = n_free - 2 * r
    among_b = by_rank - r if variant == "text" else by_rank // 2
    slot = torch.where(mergeable, protected + kept_count + among_b, protected + by_rank - 2 * r)
    slot = torch.where(by_rank >= n_free, by_rank - n_free, slot)  # the tokens that are not free
    return slot, mergeable & ~is_b, is_b


def bsm_sets(rank, free):
    """PiToMe-BSM's A and B: every free token, alternately in energy order."""
    odd = rank % 2 == 1
    return free & ~odd, free & odd


def _pitome(sim, r, protected, free, rule, valid):
    # Tokens that are not free have the lowest energy, so one ranking over all tokens gives the free
    # ones their rank among the free, and the others ranks of at least 2r (never mergeable).
    rank = rank_among(pitome_energy(sim, free, rule, valid), None, descending=True)
    if rule.variant == "bsm":
        return bipartite_match(sim, r, protected, *bsm_sets(rank, free), rank)
    n_free = token_count(sim) - protected - (free.dim() > 1)  # a frozen token (one per row) is not free
    slot, is_a, is_b = pitome_roles(token_count(rank), n_free, r, protected, rule.variant, rank.device)
    # B's bias looked up from a table of biases: one Gather, where a looked-up is_b would add a Where
    return _absorb(slot[rank], sim, is_a[rank], candidate_bias(is_b)[rank])


def crossget_scores(sim, free):
    """Similarities between distinct free tokens; every other pair -BIG."""
    pos = positions(sim)
    allowed = free.unsqueeze(-1) & free.unsqueeze(-2) & (pos.unsqueeze(-1) != pos)
    return torch.where(allowed, sim, -BIG)


def crossget_key(scores, ranked_lower):
    """A token's best similarity among the tokens ranked below it (`ranked_lower[i, j]`: j is)."""
    return torch.where(ranked_lower, scores, -BIG).amax(-1)


def dst_slots(dst, protected):
    """CrossGET's slots before the sources move: protected tokens, then destinations in position order."""
    pos = positions(dst)
    return torch.where(pos < protected, pos, protected + rank_among(pos, dst, descending=False))


def _crossget(sim, r, protected, free):
    scores = crossget_scores(sim, free)
    redundancy_rank = rank_among(scores.amax(-1), free, descending=True)
    ranked_lower = redundancy_rank.unsqueeze(-2) > redundancy_rank.unsqueeze(-1)
    src = free & (rank_among(crossget_key(scores, ranked_lower), free, descending=True) < r)
    dst = free & ~src
    return _absorb(dst_slots(dst, protected), scores, src, candidate_bias(dst))


def prepare(metric, protected, valid, frozen):
    """The pair scores every method decides on, and the tokens free to merge."""
    sim = separate_padding(cosine_similarity(fp32(metric)), valid)
    free = positions(metric, 1) >= protected  # [N]: broadcast over the batch, a constant in the graph
    if frozen is not None:
        free = free & ~frozen
    return sim, free


def max_removable(method: str, n: int, protected: int, frozen: bool = False) -> int:
    """The most tokens `method` can remove from n tokens in one layer.

    `protected` counts every token that never merges: the leading ones and, when `frozen`, one more
    anywhere (CLIP text's EOS). Where A and B alternate by position, that token may sit on one of
    A's (even) positions, so A can hold one token fewer than half of the free ones."""
    spec = get_method(method)
    limit = spec.removable(n, protected)
    if frozen and spec.pairs_by_position:
        leading = protected - 1
        even_free = (n + 1) // 2 - (leading + 1) // 2  # even positions in [leading, n)
        limit = min(limit, max(even_free - 1, 0))
    return limit


def match(
    cfg: MethodConfig,
    metric: torch.Tensor,
    r: int,
    *,
    protected: int = 1,
    layer: int = 0,
    num_layers: int = 1,
    cls_attn: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
) -> TokenMerge:
    """Decide the merge of one layer: r of the N tokens in `metric` ([B, N, D]) disappear.

    `cls_attn` ([B, N], turbo only) is the pooling token's row of the attention probabilities
    averaged over heads; `valid` ([B, N] bool) marks real tokens when the input is padded;
    `frozen` ([B, N] bool, one per row) marks a token at a data-dependent position (CLIP text's
    EOS) that never merges and moves to the last slot.
    """
    return match_step(cfg.for_layer(layer, num_layers), metric, r, protected=protected, cls_attn=cls_attn, valid=valid, frozen=frozen)


def match_step(
    rule: LayerRule,
    metric: torch.Tensor,
    r: int,
    *,
    protected: int = 1,
    cls_attn: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
) -> TokenMerge:
    """`match` for one layer's resolved rule (what the SimilarityEnergyMerge node computes)."""
    n = token_count(metric, 1)
    if r <= 0 or rule.name == "none":
        return TokenMerge.keep_all(metric)
    limit = max_removable(rule.name, n, protected + (frozen is not None), frozen=frozen is not None)
    if r > limit:
        raise ValueError(f"{rule.name} can remove at most {limit} of {n} tokens in one layer, asked for {r}")
    method = get_method(rule.name)
    if method.needs_cls_attn and cls_attn is None:
        raise ValueError(f"{rule.name} needs the CLS attention row (cls_attn)")
    sim, free = prepare(metric, protected, valid, frozen)
    slot = method.decide(sim, r, protected, free, rule, cls_attn=cls_attn, valid=valid)
    if frozen is not None:
        slot = torch.where(frozen, n - r - 1, slot)
    return TokenMerge(slot, n - r)


# The built-in methods (algorithms: docs/methods.md). Each `decide` takes the pair scores and the
# free tokens from `prepare` and returns every token's slot before the sources move.


def _decide_tome(sim, r, protected, free, rule, *, cls_attn, valid):
    return _tome(sim, r, protected, free)


def _decide_turbo(sim, r, protected, free, rule, *, cls_attn, valid):
    return _tome(sim, r, protected, free, penalty=rule.turbo_weight * cls_attn.float())


def _decide_pitome(sim, r, protected, free, rule, *, cls_attn, valid):
    return _pitome(sim, r, protected, free, rule, valid)


def _decide_crossget(sim, r, protected, free, rule, *, cls_attn, valid):
    return _crossget(sim, r, protected, free)


def _turbo_layer(knobs, layer, num_layers):
    """Turbo's alpha' = beta^|gamma - layer| * alpha * 30 (the authors' code)."""
    return {"turbo_weight": knobs["turbo_beta"] ** abs(knobs["turbo_gamma"] - layer) * knobs["turbo_alpha"] * 30.0}


def _pitome_layer(knobs, layer, num_layers):
    """The margin falls linearly from m0 to 0 over the layers; bsm-early is BSM in the first half."""
    variant = knobs["pitome_variant"]
    if variant == "bsm-early":
        variant = "bsm" if layer < num_layers // 2 else "plain"
    elif variant == "auto":  # no model to decide for: the vision default
        variant = "plain"
    margin = knobs["margin"]
    return {"margin": margin - margin * layer / num_layers, "alpha": knobs["alpha"], "variant": variant}


def _pitome_for_model(knobs, is_text):
    if knobs["pitome_variant"] == "auto":
        return {**knobs, "pitome_variant": "text" if is_text else "plain"}
    return knobs


register(MergeMethod("none", None, "no merging (the baseline)", removable=lambda n, protected: 0))
register(MergeMethod("tome", _decide_tome, "ToMe: bipartite soft matching, A = even, B = odd positions", kernel_code=0,
                     pairs_by_position=True))
register(MergeMethod(
    "pitome", _decide_pitome, "PiToMe: the lowest-energy tokens are protected, the highest-energy ones merge",
    knobs=(
        Knob("margin", 0.9, "PiToMe margin m0 (falls linearly to 0 over the layers)",
             check=lambda m: 0.0 <= m < 1.0, requirement="must be in [0, 1)"),
        Knob("alpha", 1.0, "PiToMe energy alpha (ELU)"),
        Knob("pitome_variant", "auto", "auto: text for text encoders, plain otherwise; bsm-early: BSM in the first half of the layers",
             choices=("auto", "plain", "bsm-early", "text")),
    ),
    rule_defaults={"margin": 0.9, "alpha": 1.0, "variant": "plain"},
    layer_rule=_pitome_layer, for_model=_pitome_for_model, kernel_code=1,
))
register(MergeMethod(
    "crossget", _decide_crossget, "CrossGET: the most redundant tokens merge into their best remaining partner",
    removable=lambda n, protected: max(n - protected - 1, 0), kernel_code=2,
))
register(MergeMethod(
    "turbo", _decide_turbo, "Turbo: ToMe with a penalty on tokens the CLS token attends to",
    knobs=(
        Knob("turbo_alpha", 1.0, "Turbo alpha"),
        Knob("turbo_beta", 1.0, "Turbo beta (per-layer decay of the weight)"),
        Knob("turbo_gamma", 0.0, "Turbo gamma (the layer of the largest weight)"),
        Knob("turbo_threshold", 40, "Turbo: no merging in a layer with fewer input tokens"),
    ),
    rule_defaults={"turbo_weight": 30.0}, layer_rule=_turbo_layer,
    merges=lambda knobs, tokens_in: tokens_in >= knobs["turbo_threshold"],
    needs_cls_attn=True, kernel_code=3, pairs_by_position=True,
))

METHODS = method_names()  # the built-in ones, in this order
