"""Post-norm text encoders, recognised by their modules: BERT-like (BERT, RoBERTa, XLM-RoBERTa,
ELECTRA and any model whose blocks look like BERT's), DistilBERT and MPNet. Exported at a fixed
sequence length with the attention mask; token type ids are all zero (not an input).

Padding is handled by the merge itself (see methods.separate_padding and TokenMerge.merge_padded):
it merges with padding first and never contributes to a real token, so real tokens' results do not
depend on the padding.
"""

from __future__ import annotations

import torch

from ..budgets import Shape
from ..encoder import TokenState
from ..pooling import read_pooling
from . import TextAdapter, attention_view, has_modules, random_text


DEFAULT_SEQ_LEN = 128


class Bert(TextAdapter):
    """embeddings + encoder.layer[i].attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
    intermediate, output.{dense,LayerNorm}; ELECTRA's embeddings_project when present."""

    family = "hf-bert"
    models = ("`hf:DIR` with BERT, RoBERTa, XLM-RoBERTa, ELECTRA or any model whose blocks look like BERT's "
              "(recognised by its modules, not its model type; e.g. all-MiniLM-L6-v2)")
    description = "BERT-like encoders (token type ids: all zero, not an input)"
    output_names = ("`embedding` (the sentence-transformers pooling and normalisation of the directory; otherwise the "
                    "size-weighted mean over real tokens), `last_hidden_state`, `token_sizes`, `token_mask`")
    layers_path = "encoder.layer"
    block_modules = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "attention.output.LayerNorm", "intermediate", "output.dense", "output.LayerNorm")

    def __init__(self, model, name, seq_len: int | None):
        super().__init__(model, name)
        positions = model.embeddings.position_embeddings
        # RoBERTa-style positions start after the padding index
        offset = 0 if positions.padding_idx is None else positions.padding_idx + 1
        self.set_seq_len(seq_len, DEFAULT_SEQ_LEN, positions.num_embeddings - offset)
        self.heads = model.config.num_attention_heads
        self.pooling = read_pooling(self.directory)

    @classmethod
    def accepts(cls, model):
        if not has_modules(model, "embeddings.word_embeddings", "embeddings.position_embeddings", cls.layers_path):
            return False
        layers = model.get_submodule(cls.layers_path)
        return len(layers) > 0 and not getattr(model.config, "is_decoder", False) and all(
            has_modules(layer, *cls.block_modules) for layer in layers
        )

    @classmethod
    def wrap(cls, model):
        return cls(model, type(model).__name__, seq_len=2)

    @property
    def layers(self):
        return self.model.get_submodule(self.layers_path)

    def shape(self) -> Shape:
        width = self.layers[0].output.dense.out_features
        return Shape(
            tokens=self.seq_len,
            layers=len(self.layers),
            width=width,
            mlp_width=self.layers[0].output.dense.in_features,
            heads=self.heads,
        )

    def preprocess(self):
        return self.hf_preprocess("text", None, None)

    def views(self):
        views = []
        for layer in self.layers:
            s, o = layer.attention.self, layer.attention.output
            views.append(
                attention_view(
                    s.query, s.key, s.value, o.dense, self.heads,
                    mlp=lambda x, layer=layer: layer.output.dense(layer.intermediate(x)),
                    post_attn_norm=o.LayerNorm,
                    post_mlp_norm=layer.output.LayerNorm,
                )
            )
        return views

    def random_inputs(self, batch, generator):
        return random_text(batch, self.seq_len, self.model.config.vocab_size, generator)

    def embed(self, inputs):
        ids = inputs["input_ids"]
        x = self.model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
        if getattr(self.model, "embeddings_project", None) is not None:  # ELECTRA
            x = self.model.embeddings_project(x)
        return x, self.start(x, inputs)

    def start(self, x, inputs) -> TokenState:
        return TokenState.start(x, valid=inputs["attention_mask"] > 0, mask=inputs["attention_mask"])

    def outputs(self, x, state):
        return {
            "embedding": self.pooling(x, state),
            "last_hidden_state": x,
            "token_sizes": state.size,
            "token_mask": state.valid.to(torch.int64),
        }


class DistilBert(Bert):
    """embeddings + transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}, sa_layer_norm, ffn,
    output_layer_norm (no token types)."""

    family = "hf-distilbert"
    models = "`hf:DIR` with DistilBERT"
    description = "DistilBERT (no token types)"
    output_names = "as BERT-like"
    layers_path = "transformer.layer"
    block_modules = ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                     "sa_layer_norm", "ffn.lin1", "ffn.lin2", "output_layer_norm")

    def shape(self) -> Shape:
        first = self.layers[0]
        return Shape(tokens=self.seq_len, layers=len(self.layers), width=first.ffn.lin2.out_features,
                     mlp_width=first.ffn.lin1.out_features, heads=self.heads)

    def views(self):
        return [
            attention_view(
                layer.attention.q_lin, layer.attention.k_lin, layer.attention.v_lin, layer.attention.out_lin, self.heads,
                mlp=layer.ffn, post_attn_norm=layer.sa_layer_norm, post_mlp_norm=layer.output_layer_norm,
            )
            for layer in self.layers
        ]

    def embed(self, inputs):
        x = self.model.embeddings(inputs["input_ids"])
        return x, self.start(x, inputs)


class MPNet(Bert):
    """embeddings + encoder.layer[i].attention.attn.{q,k,v,o}, attention.LayerNorm, intermediate,
    output.{dense,LayerNorm}, and a relative position bias (encoder.relative_attention_bias) shared by
    every layer.

    Merged tokens keep a position: the mean of their members' positions (padding kept out), kept as
    an exact sum of integers beside the size so every runtime rounds the same mean. The bias between two tokens is the model's own, for their positions
    rounded to the nearest integer, bucketed as the model buckets relative positions. Unmerged, the
    positions are 0..N-1, exactly what the model uses.
    """

    family = "hf-mpnet"
    models = "`hf:DIR` with MPNet (e.g. all-mpnet-base-v2)"
    description = ("MPNet (no token types; relative position bias: a merged token sits at its members' size-weighted mean "
                   "position, rounded; cost measured in [{docs}mpnet-positions.json]({docs}mpnet-positions.json))")
    output_names = "as BERT-like"
    block_modules = ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                     "attention.LayerNorm", "intermediate", "output.dense", "output.LayerNorm")

    @classmethod
    def accepts(cls, model):
        return super().accepts(model) and has_modules(model, "encoder.relative_attention_bias")

    def views(self):
        encoder = self.model.encoder

        def position_bias(positions):
            """[B,N] positions -> [B,H,N,N], as MPNetEncoder.compute_position_bias for a batch of positions."""
            rounded = positions.round().to(torch.int64)
            relative = rounded.unsqueeze(-2) - rounded.unsqueeze(-1)  # key minus query
            buckets = encoder.relative_position_bucket(relative, num_buckets=encoder.relative_attention_bias.num_embeddings)
            return encoder.relative_attention_bias(buckets).permute(0, 3, 1, 2)

        return [
            attention_view(
                layer.attention.attn.q, layer.attention.attn.k, layer.attention.attn.v, layer.attention.attn.o, self.heads,
                mlp=lambda x, layer=layer: layer.output.dense(layer.intermediate(x)),
                post_attn_norm=layer.attention.LayerNorm,
                post_mlp_norm=layer.output.LayerNorm,
                position_bias=position_bias,
            )
            for layer in self.layers
        ]

    def embed(self, inputs):
        x = self.model.embeddings(input_ids=inputs["input_ids"])
        return x, self.start(x, inputs)

    def start(self, x, inputs):
        state = super().start(x, inputs)
        state.position_sums = torch.arange(x.shape[1], device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
        return state
