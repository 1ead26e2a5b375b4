"""Raw inputs shared by both sides: token ids, position ids, a 2-D padding mask (1 = real token).

Padding and positions are what a batch of a real workload looks like: sequences of mixed lengths in one batch,
padded on the right (training) or on the left (batched generation), with position ids that count real tokens
only and may start at an offset (a continuation after a prefix). Both sides receive the same ids, mask and
positions; each builds its own attention masks and RoPE tables from them (DESIGN.md section 7).
"""
from __future__ import annotations

import torch

PADDING_SIDES = ("right", "left")


def sequence_lengths(batch: int, seq_len: int, pad_tail: int = 0, lengths=None) -> list[int]:
    """Real tokens per sequence: ``lengths`` when given, else every sequence full but the last, which ends in
    ``pad_tail`` padding positions."""
    if lengths is None:
        if pad_tail >= seq_len:
            raise ValueError(f"pad_tail {pad_tail} must be smaller than seq_len {seq_len}")
        return [seq_len] * (batch - 1) + [seq_len - pad_tail]
    lengths = [int(n) for n in lengths]
    if len(lengths) != batch or not all(1 <= n <= seq_len for n in lengths):
        raise ValueError(f"lengths {lengths} must be {batch} numbers in 1..{seq_len}")
    return lengths


def positions(mask: torch.Tensor, side: str = "right", offset: int = 0) -> torch.Tensor:
    """Position ids for a 2-D padding mask: real tokens count ``offset, offset + 1, ...`` in order. Right
    padding keeps ``offset + arange`` everywhere (its real tokens come first); left padding counts real tokens
    only (HF's ``cumsum(mask) - 1``), padded positions get ``offset``."""
    if side == "right":
        return offset + torch.arange(mask.shape[1], device=mask.device)[None].expand_as(mask).contiguous()
    return offset + (mask.long().cumsum(-1) - 1).clamp_min(0)


def repad(inputs: dict[str, torch.Tensor], side: str = "right", offset: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded inputs -> the same sequences padded on ``side``, position ids from ``positions``. Every
    per-token tensor (``[b, s]``: ids, mask, ``mm_token_type_ids``, ...) is rotated within its row, so the
    padded positions keep their values (pad id, 0) and move to the front."""
    if side not in PADDING_SIDES:
        raise ValueError(f"padding side must be one of {', '.join(PADDING_SIDES)}, got {side!r}")
    mask = inputs["attention_mask"]
    out = dict(inputs)
    if side == "left":
        b, s = mask.shape
        lengths = mask.long().sum(-1)
        if not torch.equal(mask.bool(), torch.arange(s, device=mask.device)[None] < lengths[:, None]):
            raise ValueError("repad expects right-padded inputs")
        shift = (s - lengths)[:, None]
        src = (torch.arange(s, device=mask.device)[None] - shift) % s  # row j: real tokens moved to the end
        for key, value in inputs.items():
            if key == "position_ids" or value.dim() != 2 or tuple(value.shape) != (b, s):
                continue
            out[key] = value.gather(1, src)
    out["position_ids"] = positions(out["attention_mask"], side, offset)
    return out


def text_inputs(vocab_size: int, batch: int, seq_len: int, pad_tail: int = 0, seed: int = 0,
                pad_token_id: int = 0, device="cpu", padding: str = "right", lengths=None,
                position_offset: int = 0) -> dict[str, torch.Tensor]:
    """Random ids avoiding special ids 0..2; sequence ``j`` has ``sequence_lengths(...)[j]`` real tokens (by
    default the last one is short by ``pad_tail``), padded on ``padding``; positions from ``positions``.
    Right padding with offset 0 reproduces the former inputs exactly."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, seq_len), generator=g)
    n = torch.tensor(sequence_lengths(batch, seq_len, pad_tail, lengths))
    mask = (torch.arange(seq_len)[None] < n[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad_token_id)
    inputs = repad({"input_ids": ids, "attention_mask": mask}, padding, position_offset)
    return {k: v.to(device) for k, v in inputs.items()}
