"""Megatron-Bridge's own LoRA on its Gemma 4 model (a LoRA case with system ``megatron-bridge``).

Its transform (``megatron.bridge.peft.lora.LoRA``, as its Gemma 4 recipes build it: ``default_peft_config("lora")``
= ``LoRA()``, with the case's rank, alpha and dropout) on the modules its recipe names (``linear_qkv``, ``linear_proj``,
``linear_fc1``, ``linear_fc2``), restricted to the ones the case's HF targets correspond to (``TARGETS``). On the MoE
model the recipe's ``linear_fc1`` / ``linear_fc2`` match both HF's dense MLP (``mlp.shared_experts``) and the routed
experts (``mlp.experts``, its grouped linears): the case's ``gate_proj``/``up_proj``/``down_proj`` name the former,
``"experts"`` the latter (HF: peft's ``target_parameters``), held as the case's ``lora.experts`` says: ``"shared"``
(its recipe's default, ``share_expert_adapters``: one adapter per layer for every expert) or ``"per_expert"``.

HF's adapters come in through its weight mapping, as HF's weights do (``import_``): A (``linear_in``) is the part's
``lora_A`` (the parts of a fused linear share it, ``parity.engine.adapters.SHARED_A``); B (``linear_out``) is the
parts' ``lora_B`` fused by the same mapping as the base weight (q/k/v interleaved per query group by its
``merge_qkv_weights``, gate/up by ``GatedMLPMapping``). On K=V layers HF has no ``v_proj`` and so no v adapter: its
import rule for the base weight (``maybe_modify_loaded_hf_weight``: the v slot gets a copy of k) is applied to B too;
those rows are never read (V is the k slot's raw output there), and its export declares them ``ABSENT_PROJECTION``.
The routed experts' adapters (``import_experts``): its expert mapping gives expert e HF's ``gate_up_proj[e]`` /
``down_proj[e]`` as they are, so expert e's A and B are peft's (``parity.engine.adapters.per_expert``); a shared
adapter takes them only if every expert's are the same (HF's copies of one adapter).
Its export (``save_hf_adapter``), merged export (``export_hf_weights(merge_adapter_weights=True)``) and the adapters'
gradients (its adapter export applied to them; a shared expert adapter's is its own gradient, which its export
copies to every expert: compared with HF's per-expert gradients summed, ``parity.engine.adapters.Adapters.gradient``)
are its own.

Over several ranks: at TP > 1 each rank takes its shards of HF's adapters through the mapping classes its own adapter
export picks for them (``import_``); at EP > 1 a per-expert adapter holds the rank's local experts (global index = the
rank's first expert + the local index), a shared one is on every rank (its gradient summed over EP by its own hook).
Its exports gather the shards themselves. Its MoE training forward at TP > 1 needs sequence parallelism (megatron-core's
MoE layer), which the TE stand-ins do not model yet: at TP > 1 its LoRA runs in evaluation (forward, exports).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from parity.engine import adapters as A
from parity.errors import UserError

TARGETS = {"q_proj": "self_attention.linear_qkv", "k_proj": "self_attention.linear_qkv",
           "v_proj": "self_attention.linear_qkv", "o_proj": "self_attention.linear_proj",
           "gate_proj": "{mlp}.linear_fc1", "up_proj": "{mlp}.linear_fc1", "down_proj": "{mlp}.linear_fc2"}
FUSED = {"self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"), "{mlp}.linear_fc1": ("gate_proj", "up_proj")}
EXPERTS = ("*.mlp.experts.linear_fc1", "*.mlp.experts.linear_fc2")  # the routed experts' grouped linears


def targets(spec, dense: bool) -> list[str]:
    """Its LoRA's ``target_modules`` (wildcards of its module names) for the case's HF targets."""
    mlp = "mlp" if dense else "mlp.shared_experts"
    out = []
    for name in spec.modules:
        pattern = TARGETS[name]
        parts = FUSED.get(pattern, (name,))
        if not set(parts) <= set(spec.targets):
            raise UserError(f"lora.targets: Megatron-Bridge adapts {', '.join(parts)} together (one fused linear): "
                            f"name all of them, got {list(spec.targets)}")
        target = "*." + pattern.format(mlp=mlp)
        if target not in out:
            out.append(target)
    return out + list(EXPERTS if spec.experts else ())


def apply(bm, spec):
    """Its LoRA transform on ``bm.model`` (base frozen, adapters trainable); the model left in evaluation."""
    from megatron.bridge.peft.lora import LoRA

    # as its Gemma 4 recipes make it: default_peft_config("lora") is LoRA() (its recipes package is not imported
    # here: its __init__ imports every model family's recipes)
    lora = LoRA()
    lora.target_modules = targets(spec, bm.dense)
    lora.dim, lora.alpha, lora.dropout = spec.r, spec.alpha, spec.dropout
    lora.share_expert_adapters = spec.experts != "per_expert"  # its default: one adapter for all experts
    lora(bm.model, training=True)
    bm.model.eval()
    return lora


def wrappers(bm):
    """``(its module path, its adapter wrapper)`` for every adapted module."""
    from megatron.bridge.peft.adapter_wrapper import AdapterWrapper

    return [(n, m) for n, m in bm.model.named_modules() if isinstance(m, AdapterWrapper)]


@torch.no_grad()
def import_(bm, state: dict[str, torch.Tensor]) -> list[str]:
    """HF's adapter tensors (an adapter file's keys) into its adapters, by its weight mapping; returns the HF adapter
    tensors it took. At TP > 1 each rank gets its shards through the mapping classes its own adapter export picks for
    them (``build_adapter_conversion_tasks``: A row-parallel on a row-parallel base linear, else column-parallel; B
    column-parallel), the fused B's shards as its base weight's (``GatedMLPMapping``: each rank its gate and up rows;
    ``linear_qkv``: whole query groups per rank, a plain split of its merged layout)."""
    from megatron.bridge.models.conversion.param_mapping import (ColumnParallelMapping, GatedMLPMapping,
                                                                 RowParallelMapping, merge_qkv_weights)

    bridge = bm.bridge._model_bridge
    registry = bridge.mapping_registry()
    hf = {k[len(A.FILE_PREFIX):]: v for k, v in state.items()}
    used = []
    for path, wrapper in wrappers(bm):
        if ".mlp.experts." in path:
            used += import_experts(registry, path, wrapper, hf)
            continue
        mapping = registry.megatron_to_hf_lookup(f"{path}.weight")
        roles = mapping.hf_param if isinstance(mapping.hf_param, dict) else {"": mapping.hf_param}
        a_names = {r: n[: -len(".weight")] + ".lora_A.weight" for r, n in roles.items()}
        b_names = {r: n[: -len(".weight")] + ".lora_B.weight" for r, n in roles.items()}
        present = {r: hf[b] for r, b in b_names.items() if b in hf}
        if not present:
            raise RuntimeError(f"no HF adapter for {path} ({', '.join(b_names.values())})")
        a_list = [hf[a_names[r]] for r in present]
        if any(not torch.equal(a_list[0], a) for a in a_list[1:]):
            raise RuntimeError(f"{path}: one LoRA input projection for {', '.join(present)}, HF's differ")
        used += [a_names[r] for r in present] + [b_names[r] for r in present]
        adapter = wrapper.adapter
        b_name = next(iter(b_names.values()))
        if "q" in roles:  # K=V: its import rule for the base weight (v slot = a copy of k), applied to B
            b = bridge.maybe_modify_loaded_hf_weight(b_names, {b_names[r]: t for r, t in present.items()})
            cfg = copy.copy(wrapper.to_wrap.config)  # its QKVMapping's merge, with the rank as the feature dim
            cfg.hidden_size = b["q"].shape[1]
            b_out = ColumnParallelMapping("linear_out.weight", b_name).hf_to_megatron(
                merge_qkv_weights(cfg, b["q"], b["k"], b["v"]), adapter)
        elif "" in roles:
            b_out = ColumnParallelMapping("linear_out.weight", b_name).hf_to_megatron(present[""], adapter)
        else:
            b_out = GatedMLPMapping("linear_out.weight", **b_names).hf_to_megatron(present, adapter)
        a_mapping = RowParallelMapping if adapter.input_is_parallel else ColumnParallelMapping
        a_in = a_mapping("linear_in.weight", a_names[next(iter(present))]).hf_to_megatron(a_list[0], adapter)
        adapter.linear_in.weight.copy_(a_in.to(adapter.linear_in.weight.dtype))
        adapter.linear_out.weight.copy_(b_out.to(adapter.linear_out.weight.dtype))
    return [A.FILE_PREFIX + n for n in used]


def import_experts(registry, path: str, wrapper, hf: dict[str, torch.Tensor]) -> list[str]:
    """HF's adapter of the routed experts' parameter its grouped linear ``path`` holds (``hf``: HF module keys) into
    its adapter: every local expert's (``per_expert``: at EP > 1 this rank's, global index = the rank's first expert +
    the local index, as its export reads them back), or the one a shared adapter holds (HF's must be copies of it)."""
    parameter = registry.megatron_to_hf_lookup(f"{path}.weight0").hf_param  # e.g. model.layers.0.experts.down_proj
    module = A.expert_module(parameter)
    names = {t: f"{module}.lora_{t}.weight" for t in ("A", "B")}
    if not all(n in hf for n in names.values()):
        raise RuntimeError(f"no HF adapter for {path} ({parameter})")
    experts = wrapper.to_wrap.config.num_moe_experts
    a, b = (A.per_expert(t, hf[n], experts) for t, n in names.items())
    adapter = wrapper.adapter
    if adapter.linear_in.weight.dim() == 2:  # one adapter for all experts
        if any(not torch.equal(a[0], x) for x in a[1:]) or any(not torch.equal(b[0], x) for x in b[1:]):
            raise RuntimeError(f"{path}: one adapter for all experts of {parameter}, HF's differ between experts")
        a, b = a[0], b[0]
    else:
        local = adapter.linear_in.weight.shape[0]
        first = _ranks()[0] * local
        a, b = a[first:first + local], b[first:first + local]
    gated = path.endswith(".linear_fc1")  # B follows its base weight's per-rank gate/up rows
    for weight, full, fused in ((adapter.linear_in.weight, a, False), (adapter.linear_out.weight, b, gated)):
        part = _expert_tp_part(weight, full, fused)
        if weight.shape != part.shape:
            raise RuntimeError(f"{path}: its expert adapter weight {tuple(weight.shape)}, HF's part {tuple(part.shape)}")
        weight.copy_(part.to(weight.dtype))
    return list(names.values())


def _expert_tp_part(weight: torch.Tensor, full: torch.Tensor, gated: bool) -> torch.Tensor:
    """This expert-TP rank's part of an expert adapter weight: split along the dim its adapter marks on it
    (``partition_dim``, as megatron's parallel linears and its grouped expert adapter set it; its export gathers along
    the same), ``linear_fc1``'s B each rank its rows of gate, then of up; whole at expert TP 1."""
    from parity.bridge.convert import shard

    rank, size = _ranks()[1:]
    dim = weight.partition_dim if getattr(weight, "tensor_model_parallel", False) else None
    return shard(full, dim, rank, size, gated and dim == weight.dim() - 2).contiguous()


def _ranks() -> tuple[int, int, int]:
    """(expert-parallel rank, expert-tensor-parallel rank, its size); (0, 0, 1) outside megatron's parallel state."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 0, 1
    return (ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank(),
            ps.get_expert_tensor_parallel_world_size())


def save(bm, lora, folder: str) -> None:
    """Its adapter export as its users write it: ``AutoBridge.save_hf_adapter`` (a peft adapter folder)."""
    bm.bridge.save_hf_adapter([bm.model], folder, peft_config=lora, base_model_name_or_path="", show_progress=False)


def grads(bm) -> dict[str, torch.Tensor]:
    """The adapters' gradients under the adapted HF model's parameter names: its adapter export applied to them
    (a fused linear's ``linear_in`` gradient under each part's ``lora_A``: the sum over the parts, as HF's tied A's)."""
    from parity.mbridge.training import _values

    model = bm.model
    registry = bm.bridge._model_bridge.mapping_registry()
    shared = {registry.megatron_to_hf_lookup(f"{path}.weight0").hf_param for path, w in wrappers(bm)
              if ".mlp.experts." in path and w.adapter.linear_in.weight.dim() == 2}
    g = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    with _values(model, g, only=True):  # its adapter export reads the adapters alone
        return dict(_hf_grad(name, t.detach().clone(), shared)
                    for name, t in bm.bridge.export_adapter_weights([model], cpu=False, show_progress=False))


def _hf_grad(name: str, t: torch.Tensor, shared: set[str]) -> tuple[str, torch.Tensor]:
    """One tensor of its adapter export (applied to the gradients) -> the adapted HF model's parameter and its
    gradient there. Its export names an expert adapter by the parameter (``experts.gate_up_proj.lora_A.weight``) and
    stacks every expert's (``[E, r, in]``, ``[E, out, r]``); for a shared adapter (its parameter in ``shared``) each
    is a copy of the shared gradient, which is taken; every expert's goes to peft's layout."""
    head, tail = name.rsplit(".lora_", 1)
    if not head.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        return A.param_key(name), t
    key = A.param_key(f"{A.expert_module(head)}.lora_{tail}")
    return key, t[0] if head in shared else A.from_experts(tail.split(".", 1)[0], t)


@contextmanager
def dropout_off(bm):
    """Its adapters' dropout at 0 while inside: the compared training step (a dropout mask is random on each side;
    HF's backward runs its model in evaluation, where peft's dropout is the identity)."""
    adapters = [w.adapter for _, w in wrappers(bm) if isinstance(getattr(w.adapter, "dropout", None), torch.nn.Dropout)]
    saved = [a.dropout.p for a in adapters]
    for a in adapters:
        a.dropout.p = 0.0
    try:
        yield
    finally:
        for a, p in zip(adapters, saved):
            a.dropout.p = p
