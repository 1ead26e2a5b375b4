"""Gemma 4's RMSNorm, shared by the text and vision towers (HF semantics, computed from our own weights)."""
from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """In fp32: ``x * (mean(x^2) + eps)^-0.5 [* weight]`` (plain ``weight``, not ``1 + w``), cast back to x's dtype."""
    h = x.float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        h = h * weight.float()
    return h.type_as(x)


class Gemma4RMSNorm(nn.Module):
    """RMSNorm with an optional weight. ``config`` (a megatron TransformerConfig, as megatron's attention passes
    to its q/k norm builders) or ``dtype`` sets the weight dtype."""

    def __init__(self, hidden_size: int, config=None, eps: float = 1e-6, with_scale: bool = True,
                 dtype: torch.dtype | None = None, **_):
        super().__init__()
        self.eps = eps
        dtype = dtype or (config.params_dtype if config is not None else torch.float32)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.eps, self.weight)
