"""timm VisionTransformer family: vit_*, deit_*, deit3_*, distilled, register-token and MAP-pooled
(`global_pool='map'`, SigLIP-style) models."""

from __future__ import annotations

import math

import torch

from ..budgets import Shape
from ..encoder import BlockView, TokenState, pool_attention, weighted_mean
from ..errors import UsageError
from . import ImageAdapter, load_state_dict, unsupported

RANDOM_INIT_SEED = 0


class TimmViT(ImageAdapter):
    family = "timm-vit"
    models = "`timm:vit_*`, `timm:deit_*`, `timm:deit3_*`"
    description = "timm `VisionTransformer` (token, avg or `map` pool, e.g. timm's SigLIP ViTs; distilled; register tokens)"
    output_names = "`logits` (or `embedding` for a head-less model), `last_hidden_state`, `token_sizes`"

    def __init__(self, model, name):
        super().__init__(model, name)
        from timm.models.deit import VisionTransformerDistilled

        self.distilled = isinstance(model, VisionTransformerDistilled)
        self.protected = model.num_prefix_tokens
        self.image_size = tuple(model.patch_embed.img_size)
        self.channels = model.patch_embed.proj.in_channels

    @classmethod
    def accepts(cls, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    @classmethod
    def wrap(cls, model):
        _check(model, type(model).__name__)
        return cls(model, f"timm:{type(model).__name__}")

    def bind(self, *args, x=None, **kwargs):
        """timm's forward names its input `x`."""
        if x is not None:
            kwargs["pixel_values"] = x
        return super().bind(*args, **kwargs)

    def patched_result(self, outputs):
        return next(iter(outputs.values()))

    def shape(self) -> Shape:
        m = self.model
        patches = m.patch_embed.num_patches
        c = m.embed_dim
        kernel = m.patch_embed.proj.weight[0].numel()
        head = c * m.num_classes * (2 if self.distilled else 1)
        return Shape(
            tokens=patches + m.num_prefix_tokens,
            layers=len(m.blocks),
            width=c,
            mlp_width=m.blocks[0].mlp.fc1.out_features,
            heads=m.blocks[0].attn.num_heads,
            protected=self.protected,
            extra_gflops=(patches * c * kernel + head) / 1e9,
        )

    def preprocess(self) -> dict:
        """timm's eval transform for this model (timm.data.resolve_data_config + create_transform):
        resize the shortest edge to floor(size / crop_pct), centre crop; or squash, then crop."""
        from timm.data import resolve_data_config

        # the model's own input size: a pretrained config keeps its 224 when created at another size
        cfg = resolve_data_config({"input_size": (self.channels, *self.image_size)}, model=self.model)
        height, width = cfg["input_size"][1:]
        crop_pct, mode = cfg.get("crop_pct") or 0.875, cfg.get("crop_mode") or "center"
        scaled = {"height": math.floor(height / crop_pct), "width": math.floor(width / crop_pct)}
        spec = {
            "kind": "image",
            "size": [height, width],
            "resize": {"shortest_edge": scaled["height"]} if mode == "center" else scaled,
            "crop": [height, width],
            "crop_offset": "round",
            "interpolation": cfg["interpolation"],
            "rescale": 1 / 255,
            "mean": list(cfg["mean"])[: self.channels],
            "std": list(cfg["std"])[: self.channels],
        }
        if mode not in ("center", "squash") or (mode == "center" and height != width):
            spec["unsupported"] = f"timm crop_mode {mode!r} at {height}x{width}"
        return spec

    def views(self) -> list[BlockView]:
        return [_block_view(block) for block in self.model.blocks]

    def embed(self, inputs):
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(inputs["pixel_values"]))))
        return x, TokenState.start(x)

    def outputs(self, x, state):
        m = self.model
        x = m.norm(x)
        if self.distilled:
            pooled = (m.head(x[:, 0]) + m.head_dist(x[:, 1])) / 2
        else:
            p = self.protected
            if m.attn_pool is not None:
                p = 0 if m.pool_include_prefix else p
                pooled = _attention_pool(m.attn_pool, x[:, p:], state.size[:, p:])
            elif m.global_pool == "avg":
                pooled = weighted_mean(x[:, p:], state.size[:, p:])
            else:
                pooled = x[:, 0]
            pooled = m.head(m.fc_norm(pooled))
        primary = "logits" if m.num_classes else "embedding"
        return {primary: pooled, "last_hidden_state": x, "token_sizes": state.size}


def _block_view(block) -> BlockView:
    attn = block.attn
    heads = attn.num_heads

    def qkv(h):
        b, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    return BlockView(
        qkv=qkv,
        attn_out=lambda a: block.ls1(attn.proj(attn.norm(a))),
        mlp=lambda x: block.ls2(block.mlp(block.norm2(x))),
        pre_norm=block.norm1,
    )


def _attention_pool(pool, x, size):
    """timm's AttentionPoolLatent on merged tokens: the latent queries count each token by its size."""
    b, n, c = x.shape
    q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(b, n, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    x = pool_attention(pool.q_norm(q), pool.k_norm(k), v, size)
    x = pool.proj(x)
    if pool.mlp is not None:
        x = x + pool.mlp(pool.norm(x))
    return x[:, 0] if pool.pool == "token" else x.mean(1)


def _check(model, name: str):
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise unsupported(f"timm:{name} ({type(model).__name__})")
    for block in model.blocks:
        if type(block) is not Block or type(block.attn) is not Attention or getattr(block.attn, "gate", None) is not None:
            raise unsupported(f"timm:{name} (block type {type(block).__name__}/{type(block.attn).__name__})")
    if model.global_pool not in ("token", "avg", "map"):
        raise unsupported(f"timm:{name} (global pool {model.global_pool!r}; token, avg and map are supported)")
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (pool.pos_embed is not None or pool.pool not in ("token", "avg")):
        raise unsupported(f"timm:{name} (attention pool with a position embedding or pool {pool.pool!r})")
    if getattr(model, "dynamic_img_size", False):
        raise UsageError(f"timm:{name}: dynamic image size models cannot have static token budgets; create it without dynamic_img_size")


def load_timm(name: str, weights: str | None, random_init: bool = False) -> TimmViT:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise UsageError(f"timm:{name}: unknown timm model{hint}; names are timm's, e.g. vit_base_patch16_224")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # --random-init gives the same weights every time, so runs reproduce
        model = timm.create_model(name, pretrained=False)
    _check(model, name)
    if not (weights or random_init):
        from ..sources import load_timm_pretrained

        model = load_timm_pretrained(name, model)
    if weights:
        state = load_state_dict(weights)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch
            first = str(exc).strip().splitlines()[-1].strip()
            raise UsageError(f"--weights {weights} does not fit timm:{name}: {first}")
        if result.missing_keys or result.unexpected_keys:
            missing, unexpected = result.missing_keys[:3], result.unexpected_keys[:3]
            raise UsageError(
                f"--weights {weights} does not match timm:{name}: missing {missing}, unexpected {unexpected}; "
                "give a state dict saved from this model"
            )
    adapter = TimmViT(model, f"timm:{name}")
    if "mae" in timm.models.split_model_name_tag(name)[1]:
        adapter.prop_attn = False  # ToMe's default for MAE-pretrained models
    return adapter

