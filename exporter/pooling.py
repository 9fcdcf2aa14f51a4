"""Sentence-embedding pooling on merged tokens, as a sentence-transformers directory asks for it.

A sentence-transformers directory (modules.json: Transformer, Pooling, optionally Normalize) names
a pooling mode in 1_Pooling/config.json. Each mode is defined on merged tokens, with their sizes
(how many input tokens each stands for) and the attention mask; with no merging every mode is
exactly sentence-transformers' own:

- mean: the size-weighted mean over real tokens (a merge preserves it exactly).
- mean_sqrt_len_tokens: the size-weighted sum over real tokens divided by sqrt(real tokens).
- cls: the first token (protected: it never merges).
- max: the per-channel maximum over real merged tokens (a merged token is its members' mean).
- weightedmean: sentence-transformers weighs input token i by its position (1 for the first real
  token); a merged token weighs the sum of its members' weights, followed through every merge.
- lasttoken: the merged token that holds the last real input token, followed through every merge.

Normalize (L2) is applied inside the graph, so the `embedding` output is what `encode` returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .encoder import TokenState, weighted_mean
from .errors import UsageError
from .methods import TokenMerge, cast, fp32

MODES = ("mean", "mean_sqrt_len_tokens", "cls", "max", "weightedmean", "lasttoken")
# sentence-transformers' older config: one boolean per mode
LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MODULE_TYPES = ("Transformer", "Pooling", "Normalize")  # what tokenfuse exports of a sentence-transformers model


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    normalize: bool = False

    def to_json(self) -> dict:
        return {"mode": self.mode, "normalize": self.normalize}

    def __call__(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        """The sentence embedding of merged tokens `x` [B,K,C] (state.mask: the input attention mask)."""
        valid, mask = state.valid, state.mask
        if self.mode == "mean":
            pooled = weighted_mean(x, state.size, valid)
        elif self.mode == "mean_sqrt_len_tokens":
            w = state.size * cast(valid.unsqueeze(-1), state.size.dtype)
            pooled = cast((fp32(x) * w).sum(1) / w.sum(1).sqrt(), x.dtype)
        elif self.mode == "cls":
            pooled = x[:, 0]
        elif self.mode == "max":
            pooled = torch.where(valid.unsqueeze(-1), x, torch.finfo(x.dtype).min).amax(1)
        elif self.mode == "weightedmean":
            real = mask.to(state.size.dtype)
            first = mask.to(torch.int32).argmax(1, keepdim=True)  # sentence-transformers' left-padding offset
            position = torch.arange(1, mask.shape[1] + 1, device=mask.device) - first
            pooled = weighted_mean(x, follow_merges(state, (position * real).unsqueeze(-1)))
        else:  # lasttoken
            last = mask.shape[1] - 1 - mask.flip(1).to(torch.int32).argmax(1, keepdim=True)
            holder = follow_merges(state, (torch.arange(mask.shape[1], device=mask.device) == last).unsqueeze(-1).to(state.size.dtype))
            pooled = (x * cast(holder, x.dtype)).sum(1)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def follow_merges(state: TokenState, per_token: torch.Tensor) -> torch.Tensor:
    """Sum a per-input-token quantity [B,N,1] into the tokens it ended up in, layer by layer."""
    decisions = state.replay if state.replay is not None else state.slots
    sizes = [slots.shape[1] for slots in decisions[1:]] + [state.size.shape[1]]
    for slots, num_out in zip(decisions, sizes):
        per_token = TokenMerge(slots, num_out).merge_sums(per_token[..., 0]).unsqueeze(-1)
    return per_token


def read_pooling(directory: Path | None) -> Pooling:
    """The pooling of a sentence-transformers directory; the size-weighted mean without normalisation otherwise."""
    modules_file = directory / "modules.json" if directory else None
    if modules_file is None or not modules_file.is_file():
        return Pooling()
    modules = json.loads(modules_file.read_text())
    kinds = [module["type"].rsplit(".", 1)[-1] for module in modules]
    other = [kind for kind in kinds if kind not in MODULE_TYPES]
    if other or "Pooling" not in kinds:
        raise UsageError(f"{modules_file}: tokenfuse exports Transformer, Pooling and Normalize modules; this model has "
                         f"{', '.join(other) or 'no Pooling'}, so its embedding would differ; export a directory without them")
    pooling_dir = directory / modules[kinds.index("Pooling")]["path"]
    config = json.loads((pooling_dir / "config.json").read_text())
    modes = _modes(config, pooling_dir / "config.json")
    return Pooling(mode=modes[0], normalize="Normalize" in kinds[kinds.index("Pooling"):])


def _modes(config: dict, where: Path) -> list[str]:
    if "pooling_mode" in config:
        modes = [config["pooling_mode"]] if isinstance(config["pooling_mode"], str) else list(config["pooling_mode"])
    else:
        unknown = [k for k, on in config.items() if k.startswith("pooling_mode_") and k not in LEGACY_KEYS and on]
        modes = unknown + [mode for key, mode in LEGACY_KEYS.items() if config.get(key)] or ["mean"]
    bad = [mode for mode in modes if mode not in MODES]
    if bad:
        raise UsageError(f"{where}: unknown pooling mode {bad[0]!r}; tokenfuse exports one of {', '.join(MODES)}")
    if len(modes) != 1:
        raise UsageError(f"{where}: pooling modes {', '.join(modes)} combined; tokenfuse exports one pooling mode")
    return modes
