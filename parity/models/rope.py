"""Gemma 4 rotary tables, computed from our own args (never from HF's rotary module).

HF's form is used directly: ``cos/sin = cat(freqs, freqs)`` over the whole head_dim with ``rotate_half``
pairs ``(i, i + hd/2)``. Proportional RoPE (global layers) keeps the full-head_dim denominator and sets
the frequencies of the unrotated pairs to 0. (Megatron's ``rotary_percent`` would rotate the *first*
channels with pairs ``(i, i + rot/2)`` and use ``rot`` as denominator: wrong twice.)
"""
from __future__ import annotations

import torch

from parity import compat
from parity.config import LayerArgs

compat.apply()

from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd  # noqa: E402


def inv_freq(layer: LayerArgs, device=None) -> torch.Tensor:
    hd = layer.head_dim
    if layer.rope_type == "default":
        n_rot = hd // 2
    elif layer.rope_type == "proportional":
        n_rot = int(layer.partial_rotary_factor * hd // 2)
    else:  # refused earlier by config.check_supported
        raise ValueError(f"unsupported rope_type {layer.rope_type}")
    exponents = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device=device).float() / hd
    rotated = 1.0 / (layer.rope_theta**exponents)
    return torch.cat([rotated, torch.zeros(hd // 2 - n_rot, dtype=torch.float32, device=device)])


def rotary_freqs(layer: LayerArgs, position_ids: torch.Tensor) -> torch.Tensor:
    """Angles ``[s, b, 1, head_dim]`` (megatron layout) for positions ``[b, s]``: ``cat(freqs, freqs)``."""
    freqs = position_ids.float()[..., None] * inv_freq(layer, position_ids.device)  # [b, s, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.transpose(0, 1)[:, :, None, :].contiguous()


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``t * cos + rotate_half(t) * sin`` with cos/sin cast to t's dtype (HF's dtype semantics)."""
    return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False)
