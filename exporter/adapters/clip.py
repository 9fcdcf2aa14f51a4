"""CLIP towers: vision (CLIPVisionModel) and text (CLIPTextModel), with or without the projection."""

from __future__ import annotations

import dataclasses

import torch

from ..budgets import Shape
from ..encoder import TokenState
from ..errors import UsageError
from . import ImageAdapter, TextAdapter, attention_view, random_text


# OpenAI CLIP's normalisation, used when the directory has no preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pre_norm_views(layers, heads):
    return [
        attention_view(
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj, heads,
            mlp=lambda x, layer=layer: layer.mlp(layer.layer_norm2(x)),
            pre_norm=layer.layer_norm1,
        )
        for layer in layers
    ]


class ClipVision(ImageAdapter):
    family = "hf-clip-vision"
    models = "`hf:DIR` with a CLIP or CLIP-vision checkpoint"
    description = "CLIP vision tower"
    output_names = "`pooler_output`, `image_embeds` (with the projection), `last_hidden_state`, `token_sizes`"

    @classmethod
    def from_config(cls, path, config, seq_len, tower):
        if config.model_type == "clip_vision_model" and tower == "text":
            raise UsageError(f"--tower text: hf:{path} holds the CLIP vision tower only")
        if config.model_type == "clip_vision_model" or (config.model_type == "clip" and tower == "vision"):
            return cls(_clip_class(config, "vision").from_pretrained(path, local_files_only=True), f"hf:{path}")
        return None
    metric = "hidden"  # the PiToMe authors measure CLIP similarity on the hidden states

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
        return _pre_norm_views(self.tower.encoder.layers, self.heads)

    def preprocess(self):
        """CLIPImageProcessor's defaults where the directory has no preprocessor_config.json."""
        size = self.config.image_size
        defaults = {"size": {"shortest_edge": size}, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "resample": 3}
        return self.hf_preprocess("image", CLIP_MEAN, CLIP_STD, defaults)

    def embed(self, inputs):
        x = self.tower.pre_layrnorm(self.tower.embeddings(inputs["pixel_values"]))
        return x, TokenState.start(x)

    def outputs(self, x, state):
        pooled = self.tower.post_layernorm(x[:, 0])
        out = {"pooler_output": pooled}
        if self.projection is not None:
            out["image_embeds"] = self.projection(pooled)
        out.update(last_hidden_state=x, token_sizes=state.size)
        return out


class ClipText(TextAdapter):
    """CLIP text tower: causal attention, pooled at the first EOS token.

    The EOS token sits at a data-dependent position, so it is frozen (never merges) and moves to
    the last slot once merging starts; a merged token takes its latest member's causal position.
    """

    family = "hf-clip-text"
    models = "`hf:DIR --tower text` with a CLIP or CLIP-text checkpoint"
    description = "CLIP text tower (causal, pooled at EOS)"
    output_names = "`pooler_output`, `text_embeds` (with the projection), `last_hidden_state`, `token_sizes`, `token_mask`"

    @classmethod
    def from_config(cls, path, config, seq_len, tower):
        if config.model_type == "clip_text_model" or (config.model_type == "clip" and tower == "text"):
            return cls(_clip_class(config, "text").from_pretrained(path, local_files_only=True), f"hf:{path}", seq_len)
        return None
    metric = "hidden"
    length_adaptive = False  # trained and served with every text padded to its 77 positions

    def __init__(self, model, name, seq_len: int | None):
        super().__init__(model, name)
        self.tower = model.text_model if hasattr(model, "text_model") else model
        self.projection = getattr(model, "text_projection", None)
        self.config = config = self.tower.config
        self.set_seq_len(seq_len, config.max_position_embeddings, config.max_position_embeddings)
        self.heads = config.num_attention_heads

    @classmethod
    def accepts(cls, model):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection))

    @classmethod
    def wrap(cls, model):
        return cls(model, type(model).__name__, seq_len=None)

    def shape(self) -> Shape:
        c = self.config.hidden_size
        proj = self.projection.out_features * c if self.projection is not None else 0
        return Shape(
            tokens=self.seq_len,
            layers=self.config.num_hidden_layers,
            width=c,
            mlp_width=self.config.intermediate_size,
            heads=self.heads,
            protected=2,  # the first token and the frozen EOS
            extra_gflops=proj / 1e9,
            frozen=True,
        )

    def views(self):
        return _pre_norm_views(self.tower.encoder.layers, self.heads)

    def preprocess(self):
        return self.hf_preprocess("text", None, None)

    def random_inputs(self, batch, generator):
        """Random token ids ending in EOS, then padding (the EOS id, as CLIP's tokenizer pads)."""
        eos = self._eos_id()
        inputs = random_text(batch, self.seq_len, min(self.config.vocab_size, eos), generator)
        lengths = inputs["attention_mask"].sum(1, keepdim=True)
        positions = torch.arange(self.seq_len)
        ids = torch.where(positions >= lengths - 1, eos, inputs["input_ids"])
        return {"input_ids": ids, "attention_mask": inputs["attention_mask"]}

    def vocabulary(self):
        """As the tokenizer frames a text, with the EOS that pooling finds (also padding, as CLIP's tokenizer pads)."""
        vocab = super().vocabulary()
        eos = self._eos_id()
        return dataclasses.replace(vocab, prefix=[i for i in vocab.prefix if i < eos], suffix=[eos], pad_id=eos, body_ids=vocab.body_ids[vocab.body_ids < eos])

    def _eos_id(self) -> int:
        return self.config.eos_token_id if self.config.eos_token_id != 2 else self.config.vocab_size - 1

    def embed(self, inputs):
        ids = inputs["input_ids"]
        x = self.tower.embeddings(input_ids=ids)
        if self.config.eos_token_id == 2:  # legacy configs: EOS is the largest id (as Hugging Face does)
            eos = ids.argmax(-1)
        else:
            eos = (ids == self.config.eos_token_id).to(torch.int32).argmax(-1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return x, TokenState.start(
            x,
            valid=inputs["attention_mask"] > 0,
            positions=positions.to(x.dtype).expand(ids.shape[0], -1),
            frozen=positions == eos.unsqueeze(-1),
        )

    def outputs(self, x, state):
        x = self.tower.final_layer_norm(x)
        pooled = (x * state.frozen.unsqueeze(-1).to(x.dtype)).sum(1)
        out = {"pooler_output": pooled}
        if self.projection is not None:
            out["text_embeds"] = self.projection(pooled)
        out.update(last_hidden_state=x, token_sizes=state.size, token_mask=state.valid.to(torch.int64))
        return out


def _clip_class(config, tower: str):
    """A full CLIP directory loads whole (the tower and its projection); a one-tower one as saved."""
    import transformers

    if config.model_type == "clip":
        return transformers.CLIPModel
    tower = tower.capitalize()
    with_projection = any("Projection" in arch for arch in config.architectures or [])
    return getattr(transformers, f"CLIP{tower}ModelWithProjection" if with_projection else f"CLIP{tower}Model")

