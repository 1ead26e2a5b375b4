"""Attention masks of the Megatron Gemma 4, built from raw inputs only (never taken from HF).

All masks are boolean ``[b, 1, s, s]`` with True = the query may attend to the key.
- full layers: causal, ``k <= q``;
- sliding layers: ``q - W < k <= q`` (megatron ``window_size=(W-1, 0)``);
- with ``use_bidirectional_attention == "vision"`` and ``mm_token_type_ids`` given, sliding layers use
  ``(k > q - W) and (k <= q or q, k in the same contiguous vision block)``; full layers stay causal;
- a 2-D padding mask (1 = real token) removes padded keys. Rows left with no key (padded queries) get
  their own diagonal so no NaN is produced; such positions are never compared.
"""
from __future__ import annotations

import torch


def vision_block_ids(mm_token_type_ids: torch.Tensor) -> torch.Tensor:
    """Id of the contiguous vision block (image=1 or video=2 tokens) of each position, -1 elsewhere."""
    is_vision = (mm_token_type_ids == 1) | (mm_token_type_ids == 2)
    prev = torch.zeros_like(is_vision)
    prev[..., 1:] = is_vision[..., :-1]
    starts = is_vision & ~prev
    ids = torch.cumsum(starts.long(), dim=-1) - 1
    return torch.where(is_vision, ids, torch.full_like(ids, -1))


def build_mask(
    seq_len: int,
    *,
    sliding_window: int | None,
    padding_mask: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
    batch: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    q = torch.arange(seq_len, device=device)[:, None]
    k = torch.arange(seq_len, device=device)[None, :]
    causal = k <= q
    allowed = causal[None].expand(batch, seq_len, seq_len)
    if sliding_window is not None:
        in_window = k > q - sliding_window
        if block_ids is not None:
            same_block = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
            allowed = in_window[None] & (causal[None] | same_block)
        else:
            allowed = (causal & in_window)[None].expand(batch, seq_len, seq_len)
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, :]
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed | (empty & torch.eye(seq_len, dtype=torch.bool, device=device)[None])
    return allowed[:, None]


def build_masks(
    seq_len: int,
    *,
    batch: int,
    sliding_window: int,
    padding_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    bidirectional: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Masks per layer type: ``{"full_attention": ..., "sliding_attention": ...}``."""
    block_ids = None
    if bidirectional == "vision" and mm_token_type_ids is not None:
        block_ids = vision_block_ids(mm_token_type_ids.to(device))
    return {
        "full_attention": build_mask(seq_len, sliding_window=None, padding_mask=padding_mask,
                                     batch=batch, device=device),
        "sliding_attention": build_mask(seq_len, sliding_window=sliding_window, padding_mask=padding_mask,
                                        block_ids=block_ids, batch=batch, device=device),
    }
