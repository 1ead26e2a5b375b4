"""Random test weights that make mapping bugs visible (DESIGN.md section 7).

Every parameter and every *persistent* buffer gets independent per-element values; non-persistent
computed buffers (``inv_freq``, ``embed_scale``) are left alone. Scales (norm weights, router scales,
``layer_scalar``) become ``1 + 0.1*N(0,1)`` so a norm mapped to the wrong tensor shows; clip bounds of
clippable linears become finite values that really clip.
"""
from __future__ import annotations

import torch
from torch import nn

_SCALE_SUFFIXES = ("norm.weight", "layernorm.weight", "layernorm_1.weight", "layernorm_2.weight",
                   "router.scale", "per_expert_scale", "layer_scalar", "std_scale")


def _is_scale(name: str) -> bool:
    return name.endswith(_SCALE_SUFFIXES) or ".norm" in name and name.endswith("weight")


def persistent_buffer_names(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict().keys() if k not in dict(model.named_parameters())]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Fill every parameter and persistent buffer of ``model`` in place, deterministically from ``seed``."""
    gens: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    names = dict(model.named_parameters())
    names.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    for name in sorted(names):
        t = names[name]
        if id(t) in seen:  # tied weights: one tensor, one fill
            continue
        seen.add(id(t))
        shape = t.shape
        dev = t.device
        gen = gens.setdefault(str(dev), torch.Generator(device=dev).manual_seed(seed))
        noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=dev)
        if name.endswith(("input_min", "output_min")):
            value = -(1.0 + 0.5 * torch.rand(shape, generator=gen, device=dev))
        elif name.endswith(("input_max", "output_max")):
            value = 1.0 + 0.5 * torch.rand(shape, generator=gen, device=dev)
        elif name.endswith("std_bias"):
            value = 0.1 * noise
        elif _is_scale(name):
            value = 1.0 + 0.1 * noise
        elif name.endswith("position_embedding_table"):
            value = 0.5 * noise
        elif "embed" in name and name.endswith("weight") and t.dim() == 2 and shape[0] > shape[1]:
            value = noise  # token embeddings: O(1) entries, scaled by sqrt(H) in the forward
        else:
            fan_in = shape[-1] if t.dim() >= 2 else 1
            value = noise * (std if t.dim() < 2 else min(std * 4, fan_in**-0.5))
        t.copy_(value.to(t.dtype))
    return model
