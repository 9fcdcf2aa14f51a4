"""Fixed per-layer token budgets and their FLOPs.

A budget depends only on the model's token count and the settings, never on the data, which is
what lets the exported graph have static shapes. FLOPs follow the papers' convention (fvcore: one
multiply-add counts as one FLOP) and count the transformer layers; the merge's own cost and the
embedding/head are reported apart, so both the papers' figure and the whole-model figure are seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError
from .methods import MethodConfig, max_removable


@dataclass(frozen=True)
class Shape:
    """The sizes of an encoder that FLOPs depend on."""

    tokens: int
    layers: int
    width: int
    mlp_width: int
    heads: int
    protected: int = 1  # tokens that never merge, the frozen one included
    extra_gflops: float = 0.0  # embedding and head, identical merged or not
    frozen: bool = False  # one of the protected tokens sits anywhere (CLIP text's EOS), not in front


def parse_r(text: str) -> float | int:
    """`0.9` is a kept fraction per layer (PiToMe), `13` tokens removed per layer (ToMe)."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--r {text!r} is not a number: give a kept fraction in (0, 1) or an integer >= 1")
    if "." not in text and "e" not in text.lower():
        if value < 1:
            raise UsageError(f"--r {text}: an integer r is tokens removed per layer and must be >= 1")
        return int(value)
    if not 0.0 < value < 1.0:
        raise UsageError(
            f"--r {text}: a fraction is the share of tokens kept per layer and must be in (0, 1); "
            "give an integer (e.g. 13) for tokens removed per layer"
        )
    return value


def removal(r: float | int, tokens: int, protected: int) -> int:
    """Tokens one layer removes: PiToMe's floor(T - T * ratio), T = tokens - protected, or ToMe's constant r."""
    if isinstance(r, float):
        t = tokens - protected
        return math.floor(t - t * r)
    return r


def plan_schedule(
    method: str | MethodConfig,
    shape: Shape,
    r: float | int | None = None,
    schedule: list[int] | None = None,
    min_tokens: int | None = None,
) -> tuple[int, ...]:
    """Tokens leaving each layer, checked against what `method` (a name: its default knobs) can
    merge in one layer; a layer the method's knobs say does not merge (Turbo's threshold) keeps all."""
    config = method if isinstance(method, MethodConfig) else MethodConfig(method)
    method = config.name
    n0, p = shape.tokens, shape.protected
    if method == "none":
        return (n0,) * shape.layers
    if (r is None) == (schedule is None):
        raise UsageError("give exactly one of --r and --schedule")
    if min_tokens is not None and not p < min_tokens <= n0:
        raise UsageError(f"--min-tokens {min_tokens} must be in ({p}, {n0}]: above the {p} protected token(s), at most the model's {n0}")
    if schedule is not None and len(schedule) != shape.layers:
        raise UsageError(f"--schedule has {len(schedule)} entries; the model has {shape.layers} layers")

    out, n = [], n0
    for layer in range(shape.layers):
        if schedule is not None:
            target = schedule[layer]
        elif not config.merges(n):
            target = n
        else:
            target = n - removal(r, n, p)
        if min_tokens is not None:
            target = min(n, max(target, min_tokens))
        if target > n:
            raise UsageError(f"layer {layer} would grow from {n} to {target} tokens; a schedule must not increase")
        if target <= p:
            raise UsageError(f"layer {layer} would keep {target} tokens, no more than the {p} protected one(s); use a smaller r or --min-tokens")
        limit = max_removable(method, n, p, frozen=shape.frozen)
        if n - target > limit:
            raise UsageError(
                f"layer {layer}: {method} can remove at most {limit} of {n} tokens, the budget asks for {n - target}; "
                "use a smaller r or --min-tokens"
            )
        out.append(target)
        n = target
    return tuple(out)


def layer_gflops(shape: Shape, tokens_in: int, tokens_out: int) -> float:
    """Attention at tokens_in, MLP at tokens_out (multiply-adds)."""
    c = shape.width
    attention = 4 * tokens_in * c * c + 2 * tokens_in * tokens_in * c
    mlp = 2 * tokens_out * c * shape.mlp_width
    return (attention + mlp) / 1e9


def merge_gflops(shape: Shape, tokens_in: int, tokens_out: int) -> float:
    """The merge's own multiply-adds: the similarity matrix and the assignment matmul."""
    if tokens_out == tokens_in:
        return 0.0
    head_dim = shape.width // shape.heads
    return (tokens_in * tokens_in * head_dim + tokens_in * tokens_out * shape.width) / 1e9


@dataclass(frozen=True)
class BudgetReport:
    """The per-layer table and summary printed on export and stored in the manifest."""

    shape: Shape
    schedule: tuple[int, ...]
    ratio: float | int | None

    def rows(self):
        n = self.shape.tokens
        for layer, out in enumerate(self.schedule):
            yield layer, n, out, layer_gflops(self.shape, n, out)
            n = out

    @property
    def gflops(self) -> float:
        return sum(row[3] for row in self.rows())

    @property
    def baseline_gflops(self) -> float:
        n = self.shape.tokens
        return self.shape.layers * layer_gflops(self.shape, n, n)

    @property
    def merge_overhead_gflops(self) -> float:
        return sum(merge_gflops(self.shape, n_in, n_out) for _, n_in, n_out, _ in self.rows())

    @property
    def flops_ratio(self) -> float:
        return self.gflops / self.baseline_gflops

    @property
    def whole_model_ratio(self) -> float:
        extra = self.shape.extra_gflops
        return (self.gflops + self.merge_overhead_gflops + extra) / (self.baseline_gflops + extra)

    @property
    def kept_fraction(self) -> float:
        """Tokens leaving each layer over the input count, averaged over layers."""
        return sum(self.schedule) / len(self.schedule) / self.shape.tokens

    @property
    def paper_kept_fraction(self) -> float | None:
        """PiToMe's figure for a kept ratio: the mean of ratio^i, i = 1..L."""
        if not isinstance(self.ratio, float):
            return None
        layers = self.shape.layers
        return sum(self.ratio**i for i in range(1, layers + 1)) / layers

    def table(self) -> str:
        lines = [f"{'layer':>5} {'tokens in':>9} {'tokens out':>10} {'GFLOPs':>8}"]
        lines += [f"{layer:>5} {n_in:>9} {n_out:>10} {g:>8.3f}" for layer, n_in, n_out, g in self.rows()]
        lines.append(
            f"total {self.gflops:.2f} GFLOPs vs {self.baseline_gflops:.2f} unmerged: FLOPs ratio {self.flops_ratio:.3f} "
            f"(transformer layers, multiply-adds); whole model with the merge's own cost: {self.whole_model_ratio:.3f}"
        )
        kept = f"average kept fraction {self.kept_fraction:.3f}"
        if self.paper_kept_fraction is not None:
            kept += f" (PiToMe paper's ratio^i average for {self.shape.layers} layers: {self.paper_kept_fraction:.3f})"
        lines.append(kept)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "layers": [
                {"layer": layer, "tokens_in": n_in, "tokens_out": n_out, "gflops": round(g, 6)}
                for layer, n_in, n_out, g in self.rows()
            ],
            "gflops": round(self.gflops, 6),
            "baseline_gflops": round(self.baseline_gflops, 6),
            "flops_ratio": round(self.flops_ratio, 6),
            "merge_overhead_gflops": round(self.merge_overhead_gflops, 6),
            "embedding_and_head_gflops": round(self.shape.extra_gflops, 6),
            "whole_model_flops_ratio": round(self.whole_model_ratio, 6),
            "kept_fraction": round(self.kept_fraction, 6),
            "paper_kept_fraction": None if self.paper_kept_fraction is None else round(self.paper_kept_fraction, 6),
        }
