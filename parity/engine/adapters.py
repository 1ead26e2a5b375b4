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

The routed experts (``"experts"`` in the case's targets) are parameters in HF (``experts.gate_up_proj``
``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``), adapted by peft's ``target_parameters``: one ``ParamWrapper``
per parameter, nested in the order given (``experts.base_layer`` adapts ``gate_up_proj``, ``experts`` the
``down_proj``), each holding every expert's adapter in two tensors: ``lora_A`` ``[E*r, in]`` in expert blocks (rows
``e*r + k`` = A_e[k]) and ``lora_B`` ``[out, E*r]`` interleaved (column ``k*E + e`` = B_e[:, k]). A case with
``lora.experts = "shared"`` (Megatron-Bridge's recipe: one adapter per layer for all its experts) draws one A and B
per parameter and gives every expert a copy (``replicate``): exactly what the shared adapter computes. The gradient
of a shared adapter is then the sum over the experts of peft's per-expert gradients (the adjoint of the copy): a
shared expert adapter's gradient row compares that sum (``Adapters.gradient``), in the shared tensor's shape
(``[r, in]``, ``[out, r]``). ``"per_expert"``: every expert's adapter drawn on its own.

Adapter tensors are named as an adapter file names them (``get_peft_model_state_dict``:
``base_model.model.<HF module>.lora_A.weight``); ``module_key`` / ``param_key`` turn them into the HF module and the
adapted model's parameter name, ``adapted_weight`` into the HF weight the adapter changes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from parity.errors import UserError
from parity.tensors import device_copy

FILE_PREFIX = "base_model.model."  # an adapter file's key: FILE_PREFIX + HF module + ".lora_A.weight"
ADAPTER = "default"  # peft's adapter name
SHARED_A = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
B_SCALE = 0.2  # B ~ N(0, (B_SCALE / sqrt(r))^2): the adapted output moves by a few percent of the base output
# The routed experts' parameters peft adapts (``target_parameters``), in the order it nests their wrappers, and the
# module each one's adapter sits on (under the experts module): the first innermost.
EXPERTS = {"gate_up_proj": "experts.base_layer", "down_proj": "experts"}


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

    def gradient(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The gradient a parameter's row compares: a shared expert adapter's (``lora.experts = "shared"``) is the
        sum over the experts of peft's per-expert gradients, in the shared tensor's shape (``fold``); any other is
        peft's own."""
        if self.spec.experts != "shared" or expert_parameter(name.rsplit(".lora_", 1)[0]) is None:
            return grad
        return fold(name, grad, self.spec.r)

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
    return rf"{re.escape(prefix)}layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(spec.modules)})"


def attach(model: torch.nn.Module, spec, prefix: str, dtype: torch.dtype) -> Adapters:
    """peft's LoRA on ``model`` (in place) for ``spec``, with random non-zero A and B (shared A where ``SHARED_A``;
    with ``lora.experts = "shared"`` one adapter copied to every routed expert)."""
    from peft import LoraConfig, get_peft_model

    regex = pattern(spec, prefix) if spec.modules else []
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=regex, bias="none",
                        target_parameters=[f"experts.{p}" for p in EXPERTS] if spec.experts else None)
    wrapped = get_peft_model(model, config)
    adapters = Adapters(spec=spec, peft=wrapped, model=wrapped.base_model.model, pattern=str(regex))
    if spec.experts:
        _check_experts(adapters.model)
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


def _check_experts(model: torch.nn.Module) -> None:
    """peft nested the experts' wrappers as ``EXPERTS`` says (the module each parameter's adapter sits on)."""
    from peft.tuners.lora.layer import ParamWrapper

    found = [(n, m.parameter_name) for n, m in model.named_modules() if isinstance(m, ParamWrapper)]
    if not found:
        raise UserError('lora.targets: "experts" on a model without routed experts')
    for name, parameter in found:
        if not name.endswith("." + EXPERTS[parameter]):
            raise RuntimeError(f"peft put the adapter of experts.{parameter} on {name}, not on its "
                               f"{EXPERTS[parameter]} (parity.engine.adapters.EXPERTS)")


@torch.no_grad()
def _randomize(adapters: Adapters, seed: int, dtype: torch.dtype) -> None:
    """A ~ N(0, 1/in), B ~ N(0, (B_SCALE^2/r)), in HF's module order from one generator, rounded to ``dtype``; a
    shared expert adapter drawn once (``[r, in]``, ``[out, r]``) and copied to every expert."""
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    r = adapters.spec.r
    for _, m in adapters.model.named_modules():
        shared = adapters.spec.experts == "shared" and getattr(m, "num_experts", None) is not None
        drawn = []
        for table, std in (("lora_A", None), ("lora_B", B_SCALE / math.sqrt(r))):
            layer = getattr(m, table, None)
            if layer is None or ADAPTER not in layer or id(layer[ADAPTER].weight) in seen:
                continue
            w = layer[ADAPTER].weight
            seen.add(id(w))
            shape = ((r, w.shape[1]) if table == "lora_A" else (w.shape[0], r)) if shared else w.shape
            scale = std if std is not None else 1 / math.sqrt(w.shape[1])
            drawn.append((w, (torch.randn(shape, generator=g) * scale).to(dtype).to(w.dtype)))
        if shared and drawn:
            (wa, a), (wb, b) = drawn
            drawn = list(zip((wa, wb), replicate(a, b, m.num_experts)))
        for w, v in drawn:
            w.copy_(v)


def replicate(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter (``a`` ``[r, in]``, ``b`` ``[out, r]``) for each of ``experts`` experts, in peft's layout: A in
    expert blocks ``[E*r, in]``, B interleaved ``[out, E*r]`` (column ``k*E + e`` = B_e[:, k])."""
    return a.repeat(experts, 1), b.repeat_interleave(experts, dim=1)


def per_expert(table: str, t: torch.Tensor, experts: int) -> torch.Tensor:
    """peft's expert adapter tensor (``table`` "A": ``[E*r, in]`` in expert blocks; "B": ``[out, E*r]``
    interleaved) -> every expert's: ``[E, r, in]``, ``[E, out, r]``."""
    if table == "A":
        return t.reshape(experts, -1, t.shape[-1])
    return t.reshape(t.shape[0], -1, experts).permute(2, 0, 1)


def from_experts(table: str, t: torch.Tensor) -> torch.Tensor:
    """Every expert's adapter tensor (``[E, r, in]``, ``[E, out, r]``) -> peft's layout (``per_expert``'s
    inverse)."""
    if table == "A":
        return t.reshape(-1, t.shape[-1])
    return t.permute(1, 2, 0).reshape(t.shape[1], -1)


def fold(name: str, grad: torch.Tensor, r: int) -> torch.Tensor:
    """The gradient of one adapter copied to every expert (``replicate``'s adjoint): peft's per-expert gradients of
    ``name`` (its ``lora_A`` or ``lora_B``) summed over the experts, in the shared tensor's shape."""
    if ".lora_A." in name:
        return grad.reshape(-1, r, grad.shape[-1]).sum(0)
    return grad.reshape(grad.shape[0], r, -1).sum(-1)


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


def expert_parameter(module: str) -> str | None:
    """An HF module carrying a routed-expert adapter (``EXPERTS``) -> the parameter it adapts
    (``model.layers.0.experts.base_layer`` -> ``model.layers.0.experts.gate_up_proj``), or None."""
    for parameter, where in EXPERTS.items():
        if module.endswith("." + where):
            return module[: -len(where)] + f"experts.{parameter}"
    return None


def expert_module(parameter: str) -> str:
    """``expert_parameter``'s inverse: ``model.layers.0.experts.down_proj`` -> ``model.layers.0.experts``."""
    head, name = parameter.rsplit(".experts.", 1)
    return f"{head}.{EXPERTS[name]}"


def adapted_weight(file_key: str) -> str:
    """An adapter tensor's key -> the HF weight its adapter changes (a linear's ``weight``, an experts' parameter)."""
    module = module_key(file_key)
    return expert_parameter(module) or module + ".weight"


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapted model's state dict -> HF's base weights under their own names (adapters left out; the experts'
    parameters sit under two nested wrappers)."""
    return {re.sub(r"\.base_layer(?=\.)", "", k): v for k, v in state.items() if ".lora_" not in k}
