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

from .methods import BIG, MethodConfig, TokenMerge, match

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


@dataclass(frozen=True)
class MergeSettings:
    """Everything that decides how a model merges: method, per-layer token counts, options."""

    method: MethodConfig
    schedule: tuple[int, ...]  # tokens leaving each layer
    protected: int = 1  # leading tokens that never merge (CLS, distillation token)
    prop_attn: bool = True  # add log(size) to the attention logits
    metric: str = "keys"  # keys (mean over heads) | hidden (the hidden states)


@dataclass
class TokenState:
    """What travels between layers beside x."""

    size: Tensor  # [B,N,1] patches each token stands for
    valid: Tensor | None = None  # [B,N] bool, False = padding
    merged: bool = False  # has any layer merged yet (sizes no longer all 1)
    slots: list[Tensor] = field(default_factory=list)  # each merging layer's dst_slot
    replay: list[Tensor] | None = None  # slots to apply instead of the decided ones (validation)


def attention_bias(state: TokenState, prop_attn: bool) -> Tensor | None:
    """Additive key bias [B,1,1,N]: log(size) for proportional attention, -BIG on padding."""
    bias = None
    if prop_attn and state.merged:
        bias = state.size[..., 0].log()
    if state.valid is not None:
        pad = torch.where(state.valid, 0.0, -BIG).to(state.size.dtype)
        bias = pad if bias is None else bias + pad
    return None if bias is None else bias[:, None, None, :]


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, cls_row: bool):
    """Softmax attention with an additive key bias; optionally the CLS row of the probabilities.

    Written as MatMul-Add-Softmax-MatMul, the pattern TensorRT fuses into one attention kernel.
    """
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).flatten(2)
    return out, (probs[:, :, 0].mean(1) if cls_row else None)


def run_block(view: BlockView, layer: int, x: Tensor, state: TokenState, settings: MergeSettings) -> Tensor:
    n_out = settings.schedule[layer]
    merging = n_out < x.shape[1]
    h = x if view.pre_norm is None else view.pre_norm(x)
    q, k, v = view.qkv(h)
    need_cls = merging and settings.method.name == "turbo"
    attn, cls_attn = attend(q, k, v, attention_bias(state, settings.prop_attn), need_cls)
    x = x + view.attn_out(attn)
    if view.post_attn_norm is not None:
        x = view.post_attn_norm(x)

    if merging:
        metric = k.mean(1) if settings.metric == "keys" else x
        plan = match(
            settings.method,
            metric,
            x.shape[1] - n_out,
            protected=settings.protected,
            layer=layer,
            num_layers=len(settings.schedule),
            cls_attn=cls_attn,
            valid=state.valid,
        )
        state.slots.append(plan.dst_slot)
        if state.replay is not None:  # decide (recorded above), but apply the given decision
            plan = TokenMerge(state.replay[len(state.slots) - 1], n_out)
        if state.valid is None:
            x, state.size = plan.merge(x, state.size)
        else:
            x, state.size, state.valid = plan.merge_padded(x, state.size, state.valid)
        state.merged = True

    x = x + view.mlp(x)
    if view.post_mlp_norm is not None:
        x = view.post_mlp_norm(x)
    return x


def run_encoder(views: list[BlockView], x: Tensor, state: TokenState, settings: MergeSettings) -> Tensor:
    for layer, view in enumerate(views):
        x = run_block(view, layer, x, state, settings)
    return x


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B,N,H*d] -> [B,H,N,d]"""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def weighted_mean(x: Tensor, size: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean over tokens weighted by size (and by `keep` [B,N] when given): pooling that a merge preserves."""
    w = size if keep is None else size * keep.unsqueeze(-1).to(size.dtype)
    return (x * w).sum(1) / w.sum(1)
