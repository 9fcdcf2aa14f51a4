"""Hugging Face ViTModel / ViTForImageClassification."""

from __future__ import annotations

from ..budgets import Shape
from ..encoder import TokenState
from . import ImageAdapter, attention_view


class HfViT(ImageAdapter):
    family = "hf-vit"

    def __init__(self, model, name):
        super().__init__(model, name)
        self.classifier = getattr(model, "classifier", None)
        self.vit = model.vit if self.classifier is not None else model
        config = self.vit.config
        self.image_size = (config.image_size, config.image_size)
        self.channels = config.num_channels
        self.heads = config.num_attention_heads

    @classmethod
    def accepts(cls, model):
        from transformers import ViTForImageClassification, ViTModel

        return isinstance(model, (ViTModel, ViTForImageClassification))

    def shape(self) -> Shape:
        config = self.vit.config
        patches = (config.image_size // config.patch_size) ** 2
        c = config.hidden_size
        head = c * self.classifier.out_features if self.classifier is not None else 0
        return Shape(
            tokens=patches + 1,
            layers=config.num_hidden_layers,
            width=c,
            mlp_width=config.intermediate_size,
            heads=self.heads,
            extra_gflops=(patches * c * 3 * config.patch_size**2 + head) / 1e9,
        )

    def preprocess(self):
        return self.hf_preprocess("image", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def views(self):
        views = []
        for layer in self.vit.layers:
            a = layer.attention
            views.append(
                attention_view(
                    a.q_proj, a.k_proj, a.v_proj, a.o_proj, self.heads,
                    mlp=lambda x, layer=layer: layer.mlp(layer.layernorm_after(x)),
                    pre_norm=layer.layernorm_before,
                )
            )
        return views

    def embed(self, inputs):
        x = self.vit.embeddings(inputs["pixel_values"])
        return x, TokenState.start(x)

    def outputs(self, x, state):
        x = self.vit.layernorm(x)
        out = {}
        if self.classifier is not None:
            out["logits"] = self.classifier(x[:, 0])
        elif self.vit.pooler is not None:
            out["pooler_output"] = self.vit.pooler(x)
        out.update(last_hidden_state=x, token_sizes=state.size)
        return out


def load_hf_vit(path, config) -> HfViT:
    from transformers import ViTForImageClassification, ViTModel

    classify = any("ImageClassification" in arch for arch in (config.architectures or []))
    cls = ViTForImageClassification if classify else ViTModel
    return HfViT(cls.from_pretrained(path, local_files_only=True), f"hf:{path}")
