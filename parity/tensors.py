"""Tensor helpers shared by the engine and the weight bridges (no model, no system)."""
from __future__ import annotations

import torch
from torch import Tensor

_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit-exact equality (dtype, shape and bytes; NaNs and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # the same memory (replicas sliced from one tensor, tied weights)
    bits = _SAME_SIZE_INT.get(a.element_size(), torch.uint8)
    return torch.equal(a.reshape(-1).view(bits), b.reshape(-1).view(bits))
