"""CPU compatibility for megatron-core: the one place that patches third-party code.

Applied only when CUDA is absent (``apply()`` is a no-op on a GPU machine). Every patch states
why it exists in one line. Measured against megatron-core 0.19.2 with torch 2.13 CPU.
"""
from __future__ import annotations

import sys
import types

import torch

_APPLIED = False


def _stub_triton_kernels() -> None:
    # moe/ops/paged_stash.py imports triton unguarded; its kernels are only used by CUDA-graph paging.
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules:
        return
    try:
        import triton  # noqa: F401
        return
    except ImportError:
        pass
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args, **kwargs):
        raise RuntimeError("paged stash kernels need triton and CUDA")

    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[name] = stub


def apply() -> None:
    """Install the CPU patches once; does nothing when CUDA is available."""
    global _APPLIED
    if _APPLIED:
        return
    _APPLIED = True
    _stub_triton_kernels()  # harmless on GPU too: only stubs when triton is missing
    if torch.cuda.is_available():
        return
    # megatron calls torch.cuda.current_device() to place buffers; on CPU it must name the CPU.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
