"""LoRA on the HF side of a case with ``[lora]``: HF's model with peft's LoRA is that case's reference.

``attach`` puts peft's own LoRA (``get_peft_model``, with its defaults otherwise: adapters kept in fp32 on a bf16
model, ``autocast_adapter_dtype``) on the linears of the text decoder the case names. peft replaces each target in
place (the base linear under ``base_layer``), so HF's module paths stay: every row of the alignment table observes
the adapted module, and every forward mode compares the adapted models. The base weights are frozen (LoRA
training): the backward mode's parameter rows are the adapters'.

A and B are random and non-zero (a zero B, peft's and Megatron's initialisation, hides every mapping error), drawn
from the case's ``lora.seed`` and rounded to the run's dtype (both sides then hold the same values). Adapters one
fused Megatron linear computes at once (``SHARED_A``: q/k/v_proj in ``linear_qkv``, gate/up_proj in ``linear_fc1``)
share one A: a LoRA on a fused linear has one input projection for all its parts, which an export writes as each
part's ``lora_A``. HF ties them (one Parameter): its gradient is then the sum of the parts' gradients, the adjoint
of that copy. On full-attention layers with K=V HF has no ``v_proj``: no adapter exists there, and none may be
exported.

Adapter tensors are named as an adapter file names them (``get_peft_model_state_dict``:
``base_model.model.<HF module>.lora_A.weight``); ``module_key`` / ``param_key`` turn them into the HF module and the
adapted model's parameter name.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from parity.tensors import device_copy

FILE_PREFIX = "base_model.model."  # an adapter file's key: FILE_PREFIX + HF module + ".lora_A.weight"
ADAPTER = "default"  # peft's adapter name
SHARED_A = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
B_SCALE = 0.2  # B ~ N(0, (B_SCALE / sqrt(r))^2): the adapted output moves by a few percent of the base output


@dataclass
class Adapters:
    """The HF side's LoRA: the case's ``spec`` (``parity.cases.LoraSpec``), peft's model around HF's (``peft``), the
    adapted HF model itself (``model``: HF's module paths) and the regex of the adapted modules (``pattern``)."""

    spec: Any
    peft: Any
    model: torch.nn.Module
    pattern: str

    def state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor as an adapter file holds it (peft's ``get_peft_model_state_dict``)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(self.peft).items()}

    def modules(self) -> list[str]:
        """The adapted HF modules, in HF's order."""
        from peft.tuners.lora import LoraLayer

        return [n for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]

    def merged(self, device) -> torch.nn.Module:
        """HF's model with the adapters merged by peft (``merge_and_unload`` on a copy on ``device``), in evaluation."""
        return device_copy(self.peft, device).merge_and_unload().eval()

    def base_copy(self, device) -> torch.nn.Module:
        """A copy of HF's model on ``device`` without adapters (peft's ``unload`` on a copy)."""
        return device_copy(self.peft, device).unload()

    def load_export(self, folder: str, device) -> torch.nn.Module:
        """A system's adapter export (a peft adapter folder) loaded by peft onto a copy of HF's base model on
        ``device``, as a user serves it (``PeftModel.from_pretrained``): the adapted HF model (HF's module paths), in
        evaluation."""
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(self.base_copy(device), folder, is_trainable=False)
        return loaded.base_model.model.eval()


def pattern(spec, prefix: str) -> str:
    """peft's ``target_modules`` regex: the named linears of the text decoder layers under ``prefix`` (not the vision
    tower's, whose modules carry the same names)."""
    return rf"{re.escape(prefix)}layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(spec.targets)})"


def attach(model: torch.nn.Module, spec, prefix: str, dtype: torch.dtype) -> Adapters:
    """peft's LoRA on ``model`` (in place) for ``spec``, with random non-zero A and B (shared A where ``SHARED_A``)."""
    from peft import LoraConfig, get_peft_model

    regex = pattern(spec, prefix)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=regex, bias="none")
    wrapped = get_peft_model(model, config)
    adapters = Adapters(spec=spec, peft=wrapped, model=wrapped.base_model.model, pattern=regex)
    _tie_shared_a(adapters.model)
    _randomize(adapters, spec.seed, dtype)
    wrapped.eval()
    return adapters


def _tie_shared_a(model: torch.nn.Module) -> None:
    from peft.tuners.lora import LoraLayer

    for _, parent in model.named_modules():
        for group in SHARED_A:
            parts = [getattr(parent, n) for n in group if isinstance(getattr(parent, n, None), LoraLayer)]
            for part in parts[1:]:
                part.lora_A[ADAPTER] = parts[0].lora_A[ADAPTER]


@torch.no_grad()
def _randomize(adapters: Adapters, seed: int, dtype: torch.dtype) -> None:
    """A ~ N(0, 1/in), B ~ N(0, (B_SCALE^2/r)), in HF's module order from one generator, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for _, m in adapters.model.named_modules():
        for table, std in (("lora_A", None), ("lora_B", B_SCALE / math.sqrt(adapters.spec.r))):
            layer = getattr(m, table, None)
            if layer is None or ADAPTER not in layer or id(layer[ADAPTER].weight) in seen:
                continue
            w = layer[ADAPTER].weight
            seen.add(id(w))
            scale = std if std is not None else 1 / math.sqrt(w.shape[1])
            w.copy_((torch.randn(w.shape, generator=g) * scale).to(dtype).to(w.dtype))


def module_key(file_key: str) -> str:
    """``base_model.model.<module>.lora_A.weight`` -> ``<module>``."""
    key = file_key[len(FILE_PREFIX):] if file_key.startswith(FILE_PREFIX) else file_key
    return key.rsplit(".lora_", 1)[0]


def param_key(file_key: str) -> str:
    """An adapter file's key -> the adapted HF model's parameter name (``<module>.lora_A.default.weight``)."""
    key = file_key[len(FILE_PREFIX):] if file_key.startswith(FILE_PREFIX) else file_key
    head, tail = key.rsplit(".lora_", 1)
    table, rest = tail.split(".", 1)
    return f"{head}.lora_{table}.{ADAPTER}.{rest}"


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapted model's state dict -> HF's base weights under their own names (adapters left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
