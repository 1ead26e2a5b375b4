"""Tensor helpers shared by the engine and the weight bridges (no model, no system)."""
from __future__ import annotations

import copy
from contextlib import contextmanager

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


def device_copy(module: torch.nn.Module, device) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are copies on ``device``, made there straight from the
    originals (ties kept). A plain ``deepcopy`` would first copy on the host whatever storage the tensors view: a
    sequential run's parked HF model views one staged chunk of every weight (``parity.engine.reference.park``)."""
    memo: dict = {}
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in memo:
            x = t.detach().to(device, copy=True)  # a copy even where it already is
            memo[id(t)] = torch.nn.Parameter(x, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) \
                else x
    return copy.deepcopy(module, memo)


@contextmanager
def parked(module: torch.nn.Module):
    """``module``'s parameters (with their gradients) and buffers on the host for the block, then back on the device
    each was on: the same tensor objects, their ``.data`` moved, so every reference to them (ties, optimizer state
    keys, hooks) holds. A sequential GPU run's system steps aside this way while an HF copy of the same size needs the
    card."""
    moved = []
    for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values():
        if t.device.type != "cpu":
            dev = t.device
            t.data = t.data.to("cpu")
            if t.grad is not None:
                t.grad = t.grad.to("cpu")
            moved.append((t, dev))
    try:
        yield len(moved)
    finally:
        for t, dev in moved:
            t.data = t.data.to(dev)
            if t.grad is not None:
                t.grad = t.grad.to(dev)
