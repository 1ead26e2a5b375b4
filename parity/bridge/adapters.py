"""LoRA adapters HF (peft) <-> Megatron, by the weight mapping's own rules (``mapping.py``, ``convert.TRANSFORMS``).

A Megatron LoRA on a linear has one input projection ``linear_in`` (A) and one output projection ``linear_out``
(B, in the linear's output layout). From HF's adapters: A is the ``lora_A`` of the linear's HF modules (the parts of
a fused linear share it: ``parity.engine.adapters.SHARED_A``); B is their ``lora_B`` put together by the rule that
builds the linear's weight from theirs (``qkv_pack``; ``kv_equal`` on K=V layers: the V rows get k's B, as the base
weight gets k's rows; ``gated_fc1``; ``copy``). Back to HF: B by the rule's inverse (which, on K=V layers, checks that
the V rows still equal K's and gives no ``v_proj``), A written as each part's ``lora_A``. Gradients by the adjoints
(``convert.GRAD_TO_HF``; A: the one ``linear_in`` gradient, which HF's tied A has too). The text model.

At TP > 1 each rank holds its shards of the whole (TP=1) adapter weights, split as megatron's parallel linears of
Megatron-Bridge's ``ParallelLinearAdapter`` split them (each weight's own ``partition_dim``): on a column-parallel base
linear A (``linear_in``, a column-parallel linear gathering its output) over the rank, B (``linear_out``) over the
output rows; on a row-parallel one A (a row-parallel linear) over the input, B (a column-parallel linear gathering its
output) over the output rows. A fused ``linear_fc1``'s B follows its base weight's per-rank interleave (each rank its
rows of gate, then of up: ``convert.shard``'s ``gated``); ``linear_qkv``'s rows are whole KV groups per rank, a plain
split. ``shard`` cuts this rank's part, ``gather`` puts the shards of every rank back together (weights or gradients).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from parity.bridge.convert import GRAD_TO_HF, TRANSFORMS, shard as shard_dim, unshard
from parity.bridge.mapping import expand, sizes
from parity.config import TextArgs

LINEARS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
FILE_PREFIX = "base_model.model."


def _linears(args: TextArgs):
    """``(rule, layer, HF weight names, Megatron weight name)`` of the decoder's linears (the experts excluded)."""
    for rule, i, hf, mc in expand(args):
        if i is not None and mc.endswith(LINEARS) and ".moe." not in mc:
            yield rule, i, hf, mc


def _adapter(mc: str, table: str) -> str:
    """``decoder.layers.0.self_attention.linear_qkv.weight`` -> its adapter's ``linear_in`` / ``linear_out`` weight."""
    return f"{mc[: -len('.weight')]}.adapter.{table}.weight"


def hf_to_megatron(state: dict[str, Tensor], args: TextArgs, prefix: str) -> dict[str, Tensor]:
    """HF's adapter tensors (an adapter file's keys; the text model under ``prefix``) -> Megatron adapter weights, for
    every linear with an adapter on any of its parts; a part without one gets zero B rows (and no A)."""
    out = {}
    hf = {k[len(FILE_PREFIX):] if k.startswith(FILE_PREFIX) else k: v for k, v in state.items()}
    for rule, i, names, mc in _linears(args):
        a_keys = [prefix + n[: -len(".weight")] + ".lora_A.weight" for n in names]
        b_keys = [prefix + n[: -len(".weight")] + ".lora_B.weight" for n in names]
        present = [k for k in b_keys if k in hf]
        if not present:
            continue
        a = [hf[k] for k in a_keys if k in hf]
        if any(not torch.equal(a[0], t) for t in a[1:]):
            raise ValueError(f"{mc}: one LoRA input projection for {', '.join(names)}, HF's lora_A differ")
        r = a[0].shape[0]
        s = sizes(args, i)
        rows = [hf[k] if k in hf else None for k in b_keys]
        full = [t if t is not None else torch.zeros(_rows(rule, s, j), r, dtype=a[0].dtype) for j, t in enumerate(rows)]
        out[_adapter(mc, "linear_in")] = a[0]
        out[_adapter(mc, "linear_out")] = TRANSFORMS[rule.transform][0](full, s)
    return out


def _rows(rule, s: dict, j: int) -> int:
    return s[rule.hf_shapes[j][0]]


def megatron_to_hf(adapters: dict[str, Tensor], args: TextArgs, prefix: str, grads: bool = False
                   ) -> Iterator[tuple[str, Tensor]]:
    """Megatron adapter weights (or their gradients) -> ``(HF adapter key, tensor)``, an adapter file's keys without
    its ``base_model.model.`` (``grads``: by the adjoints; A under each part's ``lora_A``)."""
    for rule, i, names, mc in _linears(args):
        a, b = adapters.get(_adapter(mc, "linear_in")), adapters.get(_adapter(mc, "linear_out"))
        if a is None or b is None:
            continue
        to_hf = GRAD_TO_HF[rule.transform] if grads else TRANSFORMS[rule.transform][1]
        for name, part in zip(names, to_hf(b, sizes(args, i), mc)):
            yield prefix + name[: -len(".weight")] + ".lora_A.weight", a
            yield prefix + name[: -len(".weight")] + ".lora_B.weight", part


def merged(state: dict[str, Tensor], adapters: dict[str, Tensor], scale: float, params: dict | None = None,
           rank: int = 0, size: int = 1) -> dict[str, Tensor]:
    """The Megatron state with each adapted linear's weight ``W + scale * B @ A`` (in the weight's dtype).
    ``adapters`` whole (``gather``); at TP > 1 ``state`` holds this rank's shards and each weight takes its part of
    the update (``params``: the base weights by the state's keys, for their split)."""
    out = dict(state)
    for key, b in adapters.items():
        if not key.endswith(".adapter.linear_out.weight"):
            continue
        base = key[: -len(".adapter.linear_out.weight")] + ".weight"
        a = adapters[key.replace("linear_out", "linear_in")]
        w = state[base]
        delta = scale * (b.float() @ a.float())
        if size > 1:
            delta = shard(base, delta, params[base], rank, size)
        out[base] = (w.float() + delta).to(w.dtype)
    return out


def _split(key: str, param) -> tuple[int | None, bool]:
    """How an adapter weight (or a base weight) is split over the TP ranks: its parallel linear's ``partition_dim``
    (``None``: whole on every rank), and whether it follows ``linear_fc1``'s gate/up interleave (B, the weight)."""
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    return dim, dim == 0 and ".linear_fc1." in key and ".linear_in." not in key


def shard(key: str, full: Tensor, param, rank: int, size: int) -> Tensor:
    """This TP rank's part of the whole adapter weight ``full`` for the adapter parameter ``param`` (``key``)."""
    dim, gated = _split(key, param)
    return shard_dim(full, dim, rank, size, gated, key).contiguous()


def gather(local: dict[str, Tensor], params: dict, group=None) -> dict[str, Tensor]:
    """Every TP rank's shards of adapter weights (or their gradients) ``local`` (keys of ``params``, the adapter
    parameters) put back together: each all-gathered over the TP ``group`` (megatron's, by default) and joined as
    ``shard`` split it; as is at TP=1."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return local
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return local
    out = {}
    for key, t in local.items():
        dim, gated = _split(key, params[key])
        if dim is None:
            out[key] = t
            continue
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        out[key] = unshard(parts, dim, gated)
    return out
