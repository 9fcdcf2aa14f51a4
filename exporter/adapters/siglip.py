"""SigLIP vision tower (SiglipVisionModel, or the vision tower of a SiglipModel): no CLS token, so
nothing is protected, and the attention-pooling head attends over the merged tokens with their
sizes (encoder.pool_attention)."""

from __future__ import annotations

import torch.nn.functional as F

from ..budgets import Shape
from ..encoder import TokenState, pool_attention, split_heads
from . import ImageAdapter, has_modules
from .clip import _pre_norm_views

BLOCK = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp")


class SiglipVision(ImageAdapter):
    family = "hf-siglip-vision"
    models = "`hf:DIR` with a SigLIP or SigLIP-vision checkpoint"
    description = "SigLIP vision tower (no CLS: every token may merge; the attention-pooling head weighs each token by its size)"
    output_names = "`pooler_output`, `last_hidden_state`, `token_sizes`"
    protected = 0

    def __init__(self, model, name):
        super().__init__(model, name)
        self.tower = model.vision_model if hasattr(model, "vision_model") else model
        self.config = config = self.tower.config
        self.image_size = (config.image_size, config.image_size)
        self.channels = config.num_channels
        self.heads = config.num_attention_heads

    @classmethod
    def accepts(cls, model):
        tower = getattr(model, "vision_model", model)
        return (
            has_modules(tower, "embeddings.patch_embedding", "embeddings.position_embedding", "encoder.layers", "post_layernorm")
            and not has_modules(tower, "pre_layrnorm")  # CLIP's
            and all(has_modules(layer, *BLOCK) for layer in tower.encoder.layers)
            and (getattr(tower, "head", None) is None or has_modules(tower.head, "attention", "layernorm", "mlp"))
        )

    def shape(self) -> Shape:
        c, p = self.config.hidden_size, self.config.patch_size
        patches = (self.config.image_size // p) ** 2
        head = self._head()
        head_flops = 0 if head is None else (patches * 2 + 2) * c * c + 2 * c * self.config.intermediate_size
        return Shape(
            tokens=patches,
            layers=self.config.num_hidden_layers,
            width=c,
            mlp_width=self.config.intermediate_size,
            heads=self.heads,
            protected=0,
            extra_gflops=(patches * c * self.channels * p * p + head_flops) / 1e9,
        )

    def _head(self):
        return getattr(self.tower, "head", None) if getattr(self.tower, "use_head", True) else None

    def views(self):
        return _pre_norm_views(self.tower.encoder.layers, self.heads)

    def preprocess(self):
        return self.hf_preprocess("image", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def embed(self, inputs):
        x = self.tower.embeddings(inputs["pixel_values"])
        return x, TokenState.start(x)

    def outputs(self, x, state):
        x = self.tower.post_layernorm(x)
        out = {}
        head = self._head()
        if head is not None:
            out["pooler_output"] = attention_pooling_head(head, x, state.size)
        out.update(last_hidden_state=x, token_sizes=state.size)
        return out


def attention_pooling_head(head, x, size):
    """SiglipMultiheadAttentionPoolingHead on merged tokens: its nn.MultiheadAttention, unrolled
    so that the probe's attention counts each token by its size."""
    mha = head.attention
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    probe = head.probe.expand(x.shape[0], -1, -1)
    q, k, v = (split_heads(F.linear(t, w, b), mha.num_heads) for t, w, b in ((probe, wq, bq), (x, wk, bk), (x, wv, bv)))
    pooled = mha.out_proj(pool_attention(q, k, v, size))
    pooled = pooled + head.mlp(head.layernorm(pooled))
    return pooled[:, 0]
