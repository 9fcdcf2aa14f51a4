"""Small random models with a trained model's statistics where they matter for merging."""

from __future__ import annotations

import torch


def trained_like(model: torch.nn.Module, scale: float = 3.0) -> torch.nn.Module:
    """Keys as trained encoders have them, highly anisotropic: a large shared bias on every key
    projection (cosines between keys crowd near 1, so candidate scores sit close together).
    Separate projections (key, k, k_proj, k_lin) and timm's fused qkv (its middle third) alike."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if not isinstance(module, torch.nn.Linear) or module.bias is None or leaf not in ("key", "k", "k_proj", "k_lin", "qkv"):
                continue
            width = module.out_features // 3 if leaf == "qkv" else module.out_features
            rows = slice(width, 2 * width) if leaf == "qkv" else slice(0, width)
            direction = torch.randn(width, generator=generator)
            weight = module.weight[rows]
            module.bias[rows] += scale * weight.norm(dim=1).mean() * module.in_features**0.5 * direction / direction.norm()
    return model
