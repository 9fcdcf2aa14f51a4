"""Pre-norm Hugging Face ViT-like image encoders, recognised by their modules: ViT, DeiT (incl.
distilled, with its teacher head), DINOv2 (layer scale) and DINOv2 with registers.

Every prefix token the embeddings add (CLS, distillation token, registers) is protected.
"""

from __future__ import annotations

from unittest import mock

import torch

from ..budgets import Shape
from ..encoder import TokenState, weighted_mean
from . import ImageAdapter, attention_view, has_modules

PREFIX_TOKENS = ("cls_token", "distillation_token", "register_tokens")


def _layers(backbone):
    for path in ("layers", "encoder.layer"):
        if has_modules(backbone, path):
            return backbone.get_submodule(path)
    return None


def _norms(layer):
    """(before attention, before the MLP): ViT/DeiT name them layernorm_before/after, DINOv2 norm1/2."""
    if has_modules(layer, "layernorm_before", "layernorm_after"):
        return layer.layernorm_before, layer.layernorm_after
    return layer.norm1, layer.norm2


def _identity(x):
    return x


class HfViT(ImageAdapter):
    family = "hf-vit"
    models = "`hf:DIR` with ViT, DeiT (incl. `DeiTForImageClassificationWithTeacher`: both heads averaged), DINOv2 (layer scale; `Dinov2WithRegisters`)"
    description = "Hugging Face ViT-like encoders; CLS, distillation and register tokens never merge"
    output_names = "`logits` or `pooler_output`, `last_hidden_state`, `token_sizes`"

    def __init__(self, model, name):
        super().__init__(model, name)
        self.vit = model.base_model
        config = self.vit.config
        self.image_size = (config.image_size, config.image_size)
        self.channels = config.num_channels
        self.heads = config.num_attention_heads
        embeddings = self.vit.embeddings
        self.protected = sum(getattr(embeddings, n).shape[1] for n in PREFIX_TOKENS if getattr(embeddings, n, None) is not None)
        self.positions = _position_table(embeddings, torch.zeros(1, self.channels, *self.image_size))

    @classmethod
    def accepts(cls, model):
        backbone = getattr(model, "base_model", None)
        layers = _layers(backbone) if backbone is not None else None
        attention = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp")
        return (
            has_modules(backbone, "embeddings.patch_embeddings", "layernorm")
            and bool(layers)
            and all(has_modules(layer, *attention) and _norms_known(layer) for layer in layers)
            and _head_known(model)
        )

    def shape(self) -> Shape:
        config = self.vit.config
        patches = (config.image_size // config.patch_size) ** 2
        c = config.hidden_size
        heads = [m for m in (getattr(self.model, n, None) for n in ("classifier", "cls_classifier", "distillation_classifier")) if m is not None]
        return Shape(
            tokens=patches + self.protected,
            layers=config.num_hidden_layers,
            width=c,
            mlp_width=next(m for m in _layers(self.vit)[0].mlp.modules() if isinstance(m, torch.nn.Linear)).out_features,
            heads=self.heads,
            protected=self.protected,
            extra_gflops=(patches * c * self.channels * config.patch_size**2 + sum(h.weight.numel() for h in heads)) / 1e9,
        )

    def preprocess(self):
        return self.hf_preprocess("image", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def views(self):
        views = []
        for layer in _layers(self.vit):
            a = layer.attention
            before, after = _norms(layer)
            scale1, scale2 = (getattr(layer, n, _identity) for n in ("layer_scale1", "layer_scale2"))
            views.append(
                attention_view(
                    a.q_proj, a.k_proj, a.v_proj, lambda o, a=a, s=scale1: s(a.o_proj(o)), self.heads,
                    mlp=lambda x, layer=layer, after=after, s=scale2: s(layer.mlp(after(x))),
                    pre_norm=before,
                )
            )
        return views

    def embed(self, inputs):
        embeddings = self.vit.embeddings
        if self.positions is None:
            x = embeddings(inputs["pixel_values"])
        else:
            table = self.positions.to(embeddings.cls_token.dtype)
            with mock.patch.object(embeddings, "interpolate_pos_encoding", lambda *_: table):
                x = embeddings(inputs["pixel_values"])
        return x, TokenState.start(x)

    def outputs(self, x, state):
        x = self.vit.layernorm(x)
        m, out = self.model, {}
        if has_modules(m, "cls_classifier", "distillation_classifier"):  # DeiT with its teacher head
            out["logits"] = (m.cls_classifier(x[:, 0]) + m.distillation_classifier(x[:, 1])) / 2
        elif getattr(m, "classifier", None) is not None:
            pooled = x[:, 0]
            if getattr(m.classifier, "in_features", None) == 2 * x.shape[-1]:  # DINOv2: CLS and the mean of the patch tokens
                p = self.protected
                pooled = torch.cat([pooled, weighted_mean(x[:, p:], state.size[:, p:])], dim=-1)
            out["logits"] = m.classifier(pooled)
        elif getattr(self.vit, "pooler", None) is not None:
            out["pooler_output"] = self.vit.pooler(x)
        elif not hasattr(self.vit, "pooler"):  # DINOv2 pools at CLS without a pooler module
            out["pooler_output"] = x[:, 0]
        out.update(last_hidden_state=x, token_sizes=state.size)
        return out


def _position_table(embeddings, pixels):
    """The position embeddings DINOv2 interpolates on every call (always when tracing, where the
    bicubic resize does not export), recorded once for the static image size; None for models
    that add their table as it is."""
    recorded = []
    interpolate = embeddings.interpolate_pos_encoding

    def record(*args):
        recorded.append(interpolate(*args).detach())
        return recorded[-1]

    with torch.no_grad(), mock.patch.object(embeddings, "interpolate_pos_encoding", record):
        embeddings(pixels)
    return recorded[0] if recorded else None


def _norms_known(layer) -> bool:
    return has_modules(layer, "layernorm_before", "layernorm_after") or has_modules(layer, "norm1", "norm2")


def _head_known(model) -> bool:
    """The base model, or a head on CLS (and the distillation token, or DINOv2's patch mean)."""
    return model is model.base_model or has_modules(model, "classifier") or has_modules(model, "cls_classifier", "distillation_classifier")
