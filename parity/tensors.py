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
    keys, hooks) holds; tensors that viewed one storage view one copy of it, there and back (``one_copy_each``). A
    sequential GPU run's system steps aside this way while an HF copy of the same size needs the card."""
    moved = [(t, t.device) for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()
             if t.device.type != "cpu"]

    def place(where) -> None:  # where(device it was on) -> where it goes
        for dev in {d for _, d in moved}:
            ts = [t for t, d in moved if d == dev]
            for t, view in zip(ts, one_copy_each(ts, where(dev))):
                t.data = view
            with_grad = [t for t in ts if t.grad is not None]
            for t, view in zip(with_grad, one_copy_each([t.grad for t in with_grad], where(dev))):
                t.grad = view

    place(lambda dev: torch.device("cpu"))
    try:
        yield len(moved)
    finally:
        place(lambda dev: dev)


def one_copy_each(tensors: list[Tensor], device) -> list[Tensor]:
    """Each of ``tensors`` as a view of a copy of its storage on ``device``, one copy per storage: tensors that shared
    memory share it there (a parameter viewing a flat buffer, tied weights), each at its own offset, size and
    stride."""
    copies: dict = {}
    out = []
    for t in tensors:
        st = t.untyped_storage()
        key = (st.device, st.data_ptr())
        if key not in copies:  # the storage's bytes as one tensor, copied (a tensor copy: any pair of devices)
            whole = torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)
            copies[key] = whole.to(device, copy=True).untyped_storage()
        out.append(torch.empty(0, dtype=t.dtype, device=device).set_(copies[key], t.storage_offset(), t.size(),
                                                                     t.stride()))
    return out
