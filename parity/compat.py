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


# ---------------------------------------------------------------------------------------------------
# NVIDIA Megatron-Bridge 0.6.2 (a system under test): patches applied only by ``apply_megatron_bridge()``,
# called by ``parity.mbridge`` before it imports the bridge. Measured with megatron-core 0.19.2 on
# Python 3.11 / 3.12, transformers 5.17 / 5.24, torch 2.11 / 2.13, no Transformer Engine.

_MBRIDGE_APPLIED = False
# megatron.bridge.data(.datasets): their __init__ import the HF `datasets` package for the SFT datasets; the
# backward mode needs only the data path's label shift (``conversation_processing``), which does not.
_BARE_BRIDGE_PACKAGES = ("megatron.bridge", "megatron.bridge.models", "megatron.bridge.data",
                         "megatron.bridge.data.datasets")


def _bridge_root() -> str | None:
    import importlib.util
    import os

    for entry in importlib.util.find_spec("megatron").submodule_search_locations or ():
        if os.path.isfile(os.path.join(entry, "bridge", "__init__.py")):
            return os.path.join(entry, "bridge")
    return None


def _bare_bridge_packages() -> None:
    # megatron/bridge/__init__.py and models/__init__.py import every model family; one of them imports
    # transformers.modeling_attn_mask_utils, gone in transformers >= 5.15: register the two packages bare.
    import os

    root = _bridge_root()
    if root is None:
        return
    for name in _BARE_BRIDGE_PACKAGES:
        if name in sys.modules:
            continue
        path = root if name == "megatron.bridge" else os.path.join(root, *name.split(".")[2:])
        module = types.ModuleType(name)
        module.__path__ = [path]
        module.__file__ = os.path.join(path, "__init__.py")
        module.__package__ = name
        sys.modules[name] = module


def _typing_override_on_311() -> None:
    # megatron/training/models/{gpt,hybrid}.py (megatron-core 0.19.2) import typing.override, new in 3.12.
    import typing

    if not hasattr(typing, "override"):
        from typing_extensions import override

        typing.override = override  # type: ignore[attr-defined]


class _TEOnly:
    """A Transformer Engine class that only TE can provide: a type for ``isinstance`` and annotations, never built."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} needs Transformer Engine (not installed here)")


def te_pytorch_standin() -> types.ModuleType:
    """The names of ``transformer_engine.pytorch`` that Megatron-Bridge's ``peft/lora_layers.py`` reads: ``Linear``,
    ``LayerNormLinear`` (``isinstance`` checks) and ``ops.Sequential`` (return annotations); each refuses to be built."""
    te = types.ModuleType("transformer_engine.pytorch")
    te.Linear = type("Linear", (_TEOnly,), {})
    te.LayerNormLinear = type("LayerNormLinear", (_TEOnly,), {})
    te.ops = types.SimpleNamespace(Sequential=type("Sequential", (_TEOnly,), {}))
    return te


def _bridge_lora_layers_without_te() -> None:
    # megatron/bridge/peft/lora_layers.py imports transformer_engine.pytorch unguarded; its LoRA classes use it only
    # in the op-fuser path (TEFusedLoRALinear, off without TE): import the real module with a TE stand-in bound
    # during that one import only, so that megatron-core never sees TE as installed.
    import importlib
    import importlib.util

    name = "megatron.bridge.peft.lora_layers"
    if name in sys.modules or importlib.util.find_spec("transformer_engine") is not None:
        return
    for dep in ("megatron.core.transformer.moe.moe_utils", "megatron.bridge.peft.adapter_wrapper",
                "megatron.bridge.peft.lora_merge"):
        importlib.import_module(dep)
    te = te_pytorch_standin()
    sys.modules["transformer_engine"] = types.ModuleType("transformer_engine")
    sys.modules["transformer_engine"].pytorch = te
    sys.modules["transformer_engine.pytorch"] = te
    try:
        importlib.import_module(name)
    finally:
        del sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"]


LORA_ATTRIBUTE_READERS: list = []  # (module, is_expert) -> adapter attributes or None; the TE stand-ins register theirs


def _bridge_lora_recognises_standins() -> None:
    # megatron/bridge/peft/utils.get_adapter_attributes_from_linear knows TE's linears and megatron-core's; the TE
    # stand-ins of parity.mbridge.substitutes are TE's LayerNormLinear (column) and Linear + norm (row) and
    # GroupedLinear: read them as their TE twins are read (LayerNormLinear: return_layernorm_output for LoRA's input);
    # megatron-core's own linears by its branch for them.
    from megatron.bridge.peft import lora, utils

    utils.HAVE_TE = False  # it reads True here (megatron-core's TE wrapper names exist without TE) and then fails
    original = utils.get_adapter_attributes_from_linear

    def attributes(m, is_expert: bool = False, pg_collection=None, sequence_parallel_input_regather: bool = False):
        twin = next((t for read in LORA_ATTRIBUTE_READERS if (t := read(m, is_expert)) is not None), None)
        if twin is None:
            return original(m, is_expert=is_expert, pg_collection=pg_collection,
                            sequence_parallel_input_regather=sequence_parallel_input_regather)
        return utils.AdapterAttributes(**twin)

    utils.get_adapter_attributes_from_linear = lora.get_adapter_attributes_from_linear = attributes


def _local_softmax_masks_on_cpu() -> None:
    # megatron-core's local DotProductAttention (the bridge's dense Gemma 4 spec) builds its causal and
    # sliding-window masks with device="cuda" hard-coded (transformer/utils.py); on CPU build the same on CPU.
    if torch.cuda.is_available():
        return
    from megatron.core.fusions import fused_softmax

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    def sliding_window_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        keep = torch.ones(sq, skv, dtype=torch.bool).triu(diagonal=skv - sq - window_size[0])
        return ~keep.tril(diagonal=skv - sq + window_size[1])

    fused_softmax.get_default_causal_mask = causal_mask
    fused_softmax.get_sliding_window_causal_mask = sliding_window_mask


def _quiet_bridge() -> None:
    # Third-party noise out of the terminal (the CLI's notices collect the "megatron" logger's records):
    # import_utils attaches its own stderr handler and logs a traceback for TE's absent FP8GlobalStateManager,
    # and the HF -> Megatron load draws a rich progress bar that no argument turns off.
    import logging

    from megatron.bridge.utils import import_utils

    log = logging.getLogger(import_utils.__name__)
    for h in [h for h in log.handlers if type(h) is logging.StreamHandler]:
        log.removeHandler(h)
    from megatron.bridge.models.conversion import model_bridge  # after: importing it logs that traceback

    track = model_bridge.MegatronModelBridge._with_progress_tracking

    def without_bar(self, tasks, description: str, show_progress: bool = True):
        return track(self, tasks, description, show_progress=False)

    model_bridge.MegatronModelBridge._with_progress_tracking = without_bar


class _FreshBuffer:
    """``GlobalMemoryBuffer.get_tensor``'s signature, a new tensor each call."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype)


def _sequence_gathers_into_fresh_memory() -> None:
    # The CPU-only allgather dispatcher (in place of alltoall) gathers into megatron's shared "mpu" buffer, so its
    # backward hands the experts' input gradient back as a view of it, which the local shared experts' sequence-
    # parallel backward overwrites before it is read; a fresh tensor per gather (same values, no aliasing).
    from megatron.core.tensor_parallel import mappings

    mappings.get_global_memory_buffer = _FreshBuffer


def apply_megatron_bridge() -> None:
    """Install the megatron-core patches and the ones Megatron-Bridge's Gemma 4 import needs, once."""
    global _MBRIDGE_APPLIED
    apply()
    if _MBRIDGE_APPLIED:
        return
    _MBRIDGE_APPLIED = True
    _bare_bridge_packages()
    _typing_override_on_311()
    _bridge_lora_layers_without_te()
    _bridge_lora_recognises_standins()
    _local_softmax_masks_on_cpu()
    _quiet_bridge()
    if not torch.cuda.is_available():
        _sequence_gathers_into_fresh_memory()
