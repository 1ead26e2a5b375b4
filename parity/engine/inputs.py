"""Raw inputs shared by both sides: token ids, position ids, a 2-D padding mask (1 = real token)."""
from __future__ import annotations

import torch


def text_inputs(vocab_size: int, batch: int, seq_len: int, pad_tail: int = 0, seed: int = 0,
                pad_token_id: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Random ids avoiding special ids 0..2; the last sequence is right-padded by ``pad_tail`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if pad_tail:
        if pad_tail >= seq_len:
            raise ValueError(f"pad_tail {pad_tail} must be smaller than seq_len {seq_len}")
        mask[-1, seq_len - pad_tail:] = 0
        ids[-1, seq_len - pad_tail:] = pad_token_id
    pos = torch.arange(seq_len)[None].expand(batch, seq_len).contiguous()
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
