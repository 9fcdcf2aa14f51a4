"""BERT-family encoders (BertModel), exported at a fixed sequence length with the attention mask.

Padding is handled by the merge itself (see methods.separate_padding and TokenMerge.merge_padded):
it merges with padding first and never contributes to a real token, so real tokens' results do not
depend on the padding.
"""

from __future__ import annotations

import torch

from ..budgets import Shape
from ..encoder import TokenState
from ..pooling import read_pooling
from . import TextAdapter, attention_view, random_text


DEFAULT_SEQ_LEN = 128


class Bert(TextAdapter):
    family = "hf-bert"

    def __init__(self, model, name, seq_len: int | None):
        super().__init__(model, name)
        self.set_seq_len(seq_len, DEFAULT_SEQ_LEN, model.config.max_position_embeddings)
        self.heads = model.config.num_attention_heads
        self.pooling = read_pooling(self.directory)

    @classmethod
    def accepts(cls, model):
        from transformers import BertModel

        return isinstance(model, BertModel)

    @classmethod
    def wrap(cls, model):
        return cls(model, type(model).__name__, seq_len=2)

    def shape(self) -> Shape:
        config = self.model.config
        return Shape(
            tokens=self.seq_len,
            layers=config.num_hidden_layers,
            width=config.hidden_size,
            mlp_width=config.intermediate_size,
            heads=self.heads,
        )

    def preprocess(self):
        return self.hf_preprocess("text", None, None)

    def views(self):
        views = []
        for layer in self.model.encoder.layer:
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
        valid = inputs["attention_mask"] > 0
        return x, TokenState.start(x, valid=valid, mask=inputs["attention_mask"])

    def outputs(self, x, state):
        return {
            "embedding": self.pooling(x, state),
            "last_hidden_state": x,
            "token_sizes": state.size,
            "token_mask": state.valid.to(torch.int64),
        }


def load_bert(path, seq_len) -> Bert:
    from transformers import BertModel

    model = BertModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return Bert(model, f"hf:{path}", seq_len)
