"""The merge-aware transformer encoder, shared by every model adapter.

An adapter describes each block as a `BlockView` (how to get q/k/v, the attention projection, the
MLP and where the norms sit); `run_encoder` runs the blocks with merging after the attention
residual and before the MLP:
    x = x + attn(norm1(x), size);  x, size = merge(x, size, metric);  x = x + mlp(norm2(x))
(post-norm models such as BERT apply their norms after each residual instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .agreement import Decision
from .methods import BIG, MethodConfig, TokenMerge, cast, fp32, match_step, token_count
from .plugin_lowering import MergeNode, merge_op

Tensor = torch.Tensor


@dataclass
class BlockView:
    """What the encoder needs from one transformer block."""

    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]  # [B,N,C] -> 3 x [B,H,N,d]
    attn_out: Callable[[Tensor], Tensor]  # [B,N,H*d] -> [B,N,C] (projection, layer scale)
    mlp: Callable[[Tensor], Tensor]  # [B,N,C] -> [B,N,C] (pre-norm models include norm2)
    pre_norm: Callable[[Tensor], Tensor] | None = None  # norm1 of pre-norm models
    post_attn_norm: Callable[[Tensor], Tensor] | None = None  # post-norm models
    post_mlp_norm: Callable[[Tensor], Tensor] | None = None
    position_bias: Callable[[Tensor], Tensor] | None = None  # token positions [B,N] -> [B,H,N,N] (MPNet)


@dataclass(frozen=True)
class MergeSettings:
    """Everything that decides how a model merges: method, per-layer token counts, options."""

    method: MethodConfig
    schedule: tuple[int, ...]  # tokens leaving each layer
    protected: int = 1  # leading tokens that never merge (CLS, distillation token)
    prop_attn: bool = True  # add log(size) to the attention logits
    metric: str = "keys"  # keys (mean over heads) | hidden (the hidden states)
    lowering: str = "onnx"  # how an export writes each merge: onnx ops | plugin (one SimilarityEnergyMerge node)
    attention: str = "auto"  # explicit (MatMul-Softmax-MatMul, what exports write) | fused (SDPA) | auto: fused on GPUs


@dataclass
class TokenState:
    """What travels between layers beside x."""

    size: Tensor  # [B,N,1] patches each token stands for
    valid: Tensor | None = None  # [B,N] bool, False = padding
    positions: Tensor | None = None  # [B,N] causal positions (causal models only)
    frozen: Tensor | None = None  # [B,N] bool: the pooling token at a data-dependent position
    # [B,N] fp32, for a relative position bias (MPNet): the sum of each token's members' positions.
    # Sums of integers are exact in any order, so every runtime gets the same mean (sum / size) and
    # rounds it the same way; a mean merged again would carry rounding that flips a .5 either way.
    position_sums: Tensor | None = None
    merged: bool = False  # has any layer merged yet (sizes no longer all 1)
    slots: list[Tensor] = field(default_factory=list)  # each merging layer's dst_slot
    replay: list[Tensor] | None = None  # slots to apply instead of the decided ones (validation)
    decisions: list[Decision] = field(default_factory=list)  # while replaying: each layer's inputs, to judge the replayed slots
    mask: Tensor | None = None  # [B,N] the input attention mask (pooling by input position)

    @classmethod
    def start(cls, x: Tensor, **fields) -> "TokenState":
        """Every token stands for one patch; sizes stay fp32 whatever the model's dtype."""
        return cls(size=torch.ones(x.shape[0], x.shape[1], 1, device=x.device), **fields)


def attention_bias(state: TokenState, prop_attn: bool) -> Tensor | None:
    """Additive attention bias (fp32): log(size) for proportional attention, -BIG on padding keys
    ([B,1,1,N]), and -BIG on later keys for causal models ([B,1,N,N])."""
    bias = None
    if prop_attn and state.merged:
        bias = state.size.reshape(-1, token_count(state.size, 1)).log()  # merged: a static count, so no Shape ops
    if state.valid is not None:
        pad = cast(torch.where(state.valid, 0.0, -BIG), state.size.dtype)
        bias = pad if bias is None else bias + pad
    if bias is not None:
        bias = bias[:, None, None, :]
    if state.positions is not None:
        later = state.positions.unsqueeze(-2) > state.positions.unsqueeze(-1)
        causal = cast(torch.where(later, -BIG, 0.0), state.size.dtype)[:, None]
        bias = causal if bias is None else bias + causal
    return bias


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, pool_row: bool, frozen: Tensor | None = None, fused: bool = False):
    """Softmax attention with an additive bias; optionally the pooling token's row of the
    probabilities averaged over heads (CLS, or the frozen token when there is one).

    Written as MatMul-Add-Softmax-MatMul, the pattern TensorRT fuses into one attention kernel.
    `fused` computes the same function with PyTorch's scaled_dot_product_attention instead (a
    flash or memory-efficient kernel on a GPU, which never writes the [B,H,N,N] probabilities);
    the bias then travels in q's dtype. It does not apply where the pooling row is needed.
    """
    if fused and not pool_row:
        mask = None if bias is None else cast(bias, q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2), None
    logits = fp32((q * int(q.shape[-1]) ** -0.5) @ k.transpose(-1, -2))  # softmax sums in fp32; the head size is a constant
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(-1)
    out = (cast(probs, v.dtype) @ v).transpose(1, 2).flatten(2)
    if not pool_row:
        return out, None
    if frozen is None:
        return out, probs[:, :, 0].mean(1)
    row = cast(frozen, probs.dtype)[:, None, :, None]  # [B,1,N,1] selects the query row
    return out, (probs * row).sum(2).mean(1)


def run_block(view: BlockView, layer: int, x: Tensor, state: TokenState, settings: MergeSettings) -> Tensor:
    n_out = settings.schedule[layer]
    merging = n_out < x.shape[1]
    h = x if view.pre_norm is None else view.pre_norm(x)
    q, k, v = view.qkv(h)
    need_row = merging and settings.method.spec.needs_cls_attn
    bias = attention_bias(state, settings.prop_attn)
    if view.position_bias is not None:
        relative = view.position_bias(state.position_sums / state.size[..., 0])
        bias = relative if bias is None else bias + relative
    fused = settings.attention == "fused" or (settings.attention == "auto" and q.is_cuda)
    attn, cls_attn = attend(q, k, v, bias, need_row, state.frozen, fused=fused)
    x = x + view.attn_out(attn)
    if view.post_attn_norm is not None:
        x = view.post_attn_norm(x)

    if merging:
        metric = k.mean(1) if settings.metric == "keys" else x
        x = _merge(settings, layer, n_out, x, metric, cls_attn, state)

    x = x + view.mlp(x)
    if view.post_mlp_norm is not None:
        x = view.post_mlp_norm(x)
    return x


def _merge(settings: MergeSettings, layer: int, n_out: int, x: Tensor, metric: Tensor, cls_attn, state: TokenState) -> Tensor:
    """Merge x down to n_out tokens, updating the state; records the decision in state.slots."""
    rule = settings.method.for_layer(layer, len(settings.schedule))
    if settings.lowering == "plugin" and state.replay is None:
        # One op, exported as a SimilarityEnergyMerge node (with the padding mask, the frozen token
        # and the causal positions when the model has them).
        node = MergeNode(rule, n_out, settings.protected, padded=state.valid is not None, causal=state.frozen is not None)
        outputs = merge_op(node, x, metric, state.size, cls_attn, state.valid, state.frozen, state.positions)
        x, size, slots = outputs[:3]
        valid = outputs[3] > 0.5 if node.padded else None
        positions = outputs[4].to(state.positions.dtype) if node.causal else None
    else:
        r = token_count(x, 1) - n_out
        plan = match_step(rule, metric, r, protected=settings.protected, cls_attn=cls_attn, valid=state.valid, frozen=state.frozen)
        slots = plan.dst_slot
        if state.replay is not None:  # decide (recorded), but apply the given decision
            state.decisions.append(Decision(rule, metric, r, settings.protected, cls_attn, state.valid, state.frozen, slots))
            plan = TokenMerge(state.replay[len(state.slots)], n_out)
        if state.position_sums is not None:  # before padding changes: a slot with real tokens sums only theirs
            state.position_sums = plan.merge_sums(state.position_sums, state.valid)
        x, size, valid, positions = plan.apply(x, state.size, state.valid, state.positions)
    state.size, state.valid, state.positions = size, valid, positions
    if state.frozen is not None:
        state.frozen = _frozen_last(x, n_out)
    state.slots.append(slots)
    state.merged = True
    return x


def _frozen_last(x: Tensor, n_out: int) -> Tensor:
    """After a merge the frozen token sits in the last slot."""
    return (torch.arange(n_out, device=x.device) == n_out - 1).expand(x.shape[0], n_out)


def run_encoder(views: list[BlockView], x: Tensor, state: TokenState, settings: MergeSettings) -> Tensor:
    for layer, view in enumerate(views):
        x = run_block(view, layer, x, state, settings)
    return x


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B,N,H*d] -> [B,H,N,d]"""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def weighted_mean(x: Tensor, size: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean over tokens weighted by size (and by `keep` [B,N] when given): pooling that a merge
    preserves. Computed in fp32, returned in x's dtype."""
    w = size if keep is None else size * cast(keep.unsqueeze(-1), size.dtype)
    return cast((fp32(x) * w).sum(1) / w.sum(1), x.dtype)


def pool_attention(q: Tensor, k: Tensor, v: Tensor, size: Tensor) -> Tensor:
    """A pooling head's attention (learned queries q [B,H,M,d] over the final tokens): each token
    counts by its size, softmax(q k^T / sqrt(d) + log size), so a merged token weighs what its
    members did. Always on, like `weighted_mean`, whatever the blocks' proportional attention."""
    return attend(q, k, v, size[..., 0].log()[:, None, None, :], pool_row=False)[0]
