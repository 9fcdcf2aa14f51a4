"""CLIP vision tower (CLIPVisionModel, with or without the projection)."""

from __future__ import annotations

from ..budgets import Shape
from ..encoder import TokenState
from . import Adapter, attention_view, image_inputs, image_spec


class ClipVision(Adapter):
    family = "hf-clip-vision"
    metric = "hidden"  # the PiToMe authors measure CLIP similarity on the hidden states
    outputs_doc = "pooler_output (and image_embeds with a projection), last_hidden_state, token_sizes"

    def __init__(self, model, name):
        super().__init__(model, name)
        self.tower = model.vision_model if hasattr(model, "vision_model") else model
        self.projection = getattr(model, "visual_projection", None)
        self.config = config = self.tower.config
        self.image_size = (config.image_size, config.image_size)
        self.heads = config.num_attention_heads

    @classmethod
    def accepts(cls, model):
        from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

        return isinstance(model, (CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection))

    def shape(self) -> Shape:
        c, p = self.config.hidden_size, self.config.patch_size
        patches = (self.config.image_size // p) ** 2
        proj = self.projection.out_features * c if self.projection is not None else 0
        return Shape(
            tokens=patches + 1,
            layers=self.config.num_hidden_layers,
            width=c,
            mlp_width=self.config.intermediate_size,
            heads=self.heads,
            extra_gflops=(patches * c * 3 * p * p + proj) / 1e9,
        )

    def views(self):
        views = []
        for layer in self.tower.encoder.layers:
            a = layer.self_attn
            views.append(
                attention_view(
                    a.q_proj, a.k_proj, a.v_proj, a.out_proj, self.heads,
                    mlp=lambda x, layer=layer: layer.mlp(layer.layer_norm2(x)),
                    pre_norm=layer.layer_norm1,
                )
            )
        return views

    def input_specs(self):
        return image_spec(self.image_size)

    def random_inputs(self, batch, generator):
        return image_inputs(self.image_size, batch, generator)

    def embed(self, inputs):
        x = self.tower.pre_layrnorm(self.tower.embeddings(inputs["pixel_values"]))
        return x, TokenState(size=x.new_ones(x.shape[0], x.shape[1], 1))

    def outputs(self, x, state):
        pooled = self.tower.post_layernorm(x[:, 0])
        out = {"pooler_output": pooled}
        if self.projection is not None:
            out["image_embeds"] = self.projection(pooled)
        out.update(last_hidden_state=x, token_sizes=state.size)
        return out


def load_clip_vision(path, config) -> ClipVision:
    """A full CLIP directory gives its vision tower with the projection; a vision-only one as saved."""
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    if config.model_type == "clip":
        cls = CLIPModel
    elif any("Projection" in arch for arch in config.architectures or []):
        cls = CLIPVisionModelWithProjection
    else:
        cls = CLIPVisionModel
    return ClipVision(cls.from_pretrained(path, local_files_only=True), f"hf:{path}")
