"""Megatron layouts -> HF layouts: what both Megatron-core systems under test share (``ours``: system ``parity``;
``megatron_bridge``: NVIDIA Megatron-Bridge's Gemma 4).

Megatron modules run sequence-first (``[s, b, ...]``) on this rank's tensor-parallel shard; they fuse q, k, v
into one ``linear_qkv`` and gate and up into one ``linear_fc1``; their router works on ``[s*b, ...]`` tokens.
HF's modules are batch-first, whole, unfused, with tokens in ``[b*s, ...]`` order. ``to_hf`` is the common
tail: a Megatron ``[s, b, ...]`` output -> the layout of its alignment row (``parity.engine.system.System``).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from parity.engine.alignment import Aligned, Kind, Part

if TYPE_CHECKING:
    from parity.config import TextArgs


def sb(x: torch.Tensor, contiguous: bool = False) -> torch.Tensor:
    """``[b, s, ...]`` <-> ``[s, b, ...]``: a transposed view, or with ``contiguous`` a contiguous copy (for
    modules that ``view`` their inputs; same values)."""
    x = x.transpose(0, 1)
    return x.contiguous() if contiguous else x


def first(x):
    """The first tensor of a module's output: ``(output, bias)``, ``(hidden, context)`` and nestings of them."""
    while isinstance(x, (tuple, list)):
        x = x[0]
    return x


# -- tensor parallelism ----------------------------------------------------------------------------------

def tp_size() -> int:
    """The tensor-parallel world size (1 before megatron's model-parallel state is initialised)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor-parallel shard along its last dim (heads / vocab / intermediate); as is for TP=1."""
    if tp_size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(x.contiguous())


def tp_slice(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``x``'s last dim: what a row-parallel linear (weight split along its input
    features) takes of a whole HF input; as is for TP=1."""
    n = tp_size()
    if n == 1:
        return x
    from megatron.core import parallel_state

    return x.chunk(n, dim=-1)[parallel_state.get_tensor_model_parallel_rank()]


def tp_split(x: torch.Tensor) -> torch.Tensor:
    """``tp_slice`` through autograd: forward this rank's slice, backward every rank's slice gradient gathered (the
    gradient of a whole input that a row-parallel linear reads a slice of on each rank); as is for TP=1."""
    if tp_size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region

    return scatter_to_tensor_model_parallel_region(x)


# -- sequence parallelism ----------------------------------------------------------------------------------
# Under megatron's sequence parallelism what lies outside the tensor-parallel regions -- the residual stream and every
# value of hidden size a replicated module (a norm, a layer, an MLP block, a router) or a row-parallel linear (its
# reduce-scatter) writes -- is this rank's shard of the sequence, ``[s/tp, b, ...]`` (router tokens ``[s/tp*b, ...]``);
# what a column-parallel linear writes and a row-parallel linear reads (features, heads, vocabulary split over TP),
# with the per-head norms and the core attention between them, holds the whole sequence. By the row's kind:
SEQUENCE_SHARDED = frozenset({Kind.EMBEDDING, Kind.MERGED, Kind.LAYER, Kind.NORM, Kind.FLAT_NORM, Kind.ATTENTION,
                              Kind.LINEAR, Kind.MLP, Kind.ROUTER, Kind.EXPERTS})  # a row's value (MERGED: the
# decoder's input, what a VLM scatters over the sequence; a VLM's text embedding is whole where its embedding is built
# without the scatter: the system says so, ``to_hf(sequence_parallel=False)``)
WHOLE_SEQUENCE_INPUT = frozenset({Kind.LINEAR, Kind.HEAD_NORM})  # a row's module's input: row-parallel, per-head;
# every other module whose input is read (a layer, a norm, a column-parallel linear: its all-gather is inside it, an
# MLP block, a router, the output layer) takes this rank's sequence shard


def sp_sharded(a: Aligned, io: str = "output") -> bool:
    """Whether row ``a``'s value (``io="output"``) or its module's input (``"input"``) is a sequence shard under
    sequence parallelism (``SEQUENCE_SHARDED``, ``WHOLE_SEQUENCE_INPUT``)."""
    kind = a.row.kind
    return kind in SEQUENCE_SHARDED if io == "output" else kind not in WHOLE_SEQUENCE_INPUT


def sp_gather(x: torch.Tensor, whole: int) -> torch.Tensor:
    """This rank's sequence shard (first dim ``whole / tp``) -> the whole sequence (first dim ``whole``), all-gathered
    along the first dim (backward: this rank's part of the gradient, as each rank's copy of the whole is the same).
    A tensor of another length is a layout the caller did not expect: an error."""
    n = tp_size()
    if x.shape[0] * n != whole:
        raise ValueError(f"expected a sequence shard of {whole} // {n} rows, got {tuple(x.shape)}")
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x.contiguous(), tensor_parallel_output_grad=False)


def sp_split(x: torch.Tensor) -> torch.Tensor:
    """The whole sequence ``[s, ...]`` -> this rank's shard ``[s/tp, ...]`` (backward: every rank's shard gradient
    gathered): what a module under sequence parallelism takes of a whole input."""
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    return scatter_to_sequence_parallel_region(x.contiguous())


# -- fused projections, per-head norms, router tokens -------------------------------------------------------

def split_qkv(mixed: torch.Tensor, part: Part, np_: int, hn: int, ng: int) -> torch.Tensor:
    """Megatron fused QKV output ``[..., ng_l*(np/ng+2)*hn]`` -> the q, k or v part ``[..., heads*hn]``."""
    rep = np_ // ng
    lead = mixed.shape[:-1]
    g = mixed.reshape(*lead, mixed.shape[-1] // ((rep + 2) * hn), (rep + 2) * hn)
    q, k, v = g.split([rep * hn, hn, hn], dim=-1)
    return {Part.Q: q, Part.K: k, Part.V: v}[part].reshape(*lead, -1)


def qkv_part(x: torch.Tensor, part: Part, args: TextArgs, layer: int) -> torch.Tensor:
    """This rank's fused ``linear_qkv`` output -> HF's q, k or v projection (each rank holds whole KV groups
    ``[q..; k; v]``, so the gathered shards are the whole fused layout)."""
    la = args.layers[layer]
    return split_qkv(tp_gather(x), part, args.num_heads, la.head_dim, la.num_kv_heads)


def fc1_part(x: torch.Tensor, part: Part) -> torch.Tensor:
    """This rank's fused ``linear_fc1`` output ``[gate_r; up_r]`` -> HF's gate or up projection, gathered."""
    return tp_gather(x.chunk(2, dim=-1)[0 if part is Part.GATE else 1])


def head_count(a: Aligned, args: TextArgs) -> int:
    """HF's number of heads of per-head norm row ``a``: a k norm's are its layer's KV heads, a q norm's the query
    heads."""
    return args.layers[a.layer].num_kv_heads if a.hf.endswith("k_norm") else args.num_heads


def split_heads(x: torch.Tensor) -> torch.Tensor:
    """HF's whole ``[..., heads, d]`` -> this rank's heads through autograd (backward: the whole input's gradient on
    every rank). With fewer heads than TP ranks (megatron-core's ``num_query_groups < tp``: each KV head computed on
    tp/heads consecutive ranks, next to their query heads) the rank's one head; its backward sums every rank's part,
    which ``gather_heads`` leaves zero on all but a head's first rank."""
    n, h = tp_size(), x.shape[-2]
    if n == 1:
        return x
    if h >= n:
        return tp_split(x.flatten(-2)).unflatten(-1, (-1, x.shape[-1]))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    i = parallel_state.get_tensor_model_parallel_rank() // (n // h)
    return copy_to_tensor_model_parallel_region(x)[..., i:i + 1, :]


def gather_heads(x: torch.Tensor, heads: int | None = None, grad: bool = False) -> torch.Tensor:
    """``[s, b, heads/tp, d]`` (a per-head norm's value on this rank's heads) -> ``[s, b, heads, d]``. With fewer
    ``heads`` than TP ranks (``split_heads``) each head is on several consecutive ranks: its value is the first's (they
    agree), its gradient (``grad``) the sum over them (each rank's attention reads the head with its own query heads
    only)."""
    y = tp_gather(x.flatten(2)).unflatten(2, (-1, x.shape[-1]))
    rep = y.shape[2] // heads if heads else 1
    if rep > 1:
        y = y.unflatten(2, (heads, rep))
        y = y.sum(3) if grad else y[:, :, :, 0]
    return y


def hf_token_order(t: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """Megatron's router tokens ``[s*b, ...]`` (sequence-major) -> HF's ``[b*s, ...]`` (batch-major)."""
    return t.reshape(s, b, -1).transpose(0, 1).reshape(b * s, -1)


# -- the common tail ----------------------------------------------------------------------------------------

FLAT = (Kind.EXPERTS, Kind.FLAT_NORM)  # rows HF computes on flattened tokens ``[b*s, H]``


def to_hf(a: Aligned, x: torch.Tensor, b: int, s: int, args: TextArgs, *, contiguous: bool = False,
          sequence_parallel: bool = False, grad: bool = False) -> torch.Tensor:
    """A Megatron output ``[s, b, ...]`` (this rank's shard) -> row ``a``'s HF layout: the row's ``Part`` of a
    fused projection, column-parallel outputs (heads, features, vocab) gathered, batch-first, ``[b*s, H]`` for
    ``FLAT`` rows. ``contiguous``: the transpose as a contiguous copy (same values). ``sequence_parallel``: a
    sequence-sharded row's value (``sp_sharded``) gathered along the sequence first. ``grad``: ``x`` is a gradient
    (heads on several ranks summed: ``gather_heads``)."""
    kind = a.row.kind
    if sequence_parallel and sp_sharded(a):
        x = sp_gather(x, s)
    if kind is Kind.QKV:
        x = qkv_part(x, a.row.part, args, a.layer)
    elif kind is Kind.FC1:
        x = fc1_part(x, a.row.part)
    elif kind is Kind.HEAD_NORM and tp_size() > 1:
        heads = head_count(a, args)
        if x.shape[2] != heads or heads < tp_size():  # (one head on several ranks: a gradient is their sum)
            x = gather_heads(x, heads, grad)
    elif kind is Kind.LM_HEAD:
        x = tp_gather(x)
    x = sb(x, contiguous)
    return x.reshape(b * s, -1) if kind in FLAT else x


def input_to_hf(a: Aligned, x: torch.Tensor, b: int, s: int, module=None, *, args: TextArgs | None = None,
                sequence_parallel: bool = False, grad: bool = False) -> torch.Tensor:
    """A Megatron module's input ``[s, b, ...]`` (or a gradient with respect to it) -> the layout of the HF
    module's input for row ``a``: a row-parallel linear's slice of the features and per-head norms' heads
    gathered, batch-first, ``[b*s, H]`` for ``FLAT`` rows. ``sequence_parallel``: a sequence-sharded input
    (``sp_sharded``) gathered along the sequence first. ``args`` (the heads of a per-head norm where TP may exceed
    them) and ``grad`` as for ``to_hf``."""
    kind = a.row.kind
    module = getattr(module, "to_wrap", module)  # a LoRA wrapper (Megatron-Bridge's): the linear it adapts
    if sequence_parallel and sp_sharded(a, "input"):
        x = sp_gather(x, s)
    if (kind is Kind.LINEAR and tp_size() > 1 and getattr(getattr(module, "weight", None), "partition_dim", None) == 1
            and getattr(module, "input_is_parallel", True)):  # (one built with input_is_parallel=False reads it whole)
        x = tp_gather(x)
    elif kind is Kind.HEAD_NORM and tp_size() > 1:
        x = gather_heads(x, head_count(a, args) if args is not None else None, grad)
    x = sb(x)
    return x.reshape(b * s, -1) if kind in FLAT else x


# -- the training step in a world of several ranks -------------------------------------------------------------

def several_ranks() -> bool:
    """Whether this process is one rank of a world of several (tensors sharded: gathers and collectives)."""
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def finalize_grads(chunk: torch.nn.Module, config, experts: set[int]) -> None:
    """What megatron-core does with the gradients between the backward and the optimizer
    (``finalize_model_grads``) for a model chunk ``chunk`` whose expert parameters are ``experts`` (ids). Its DDP at
    data-parallel size dp > 1 (``average_in_collective`` off): every gradient divided by dp and summed over its
    data-parallel group -- the experts' over the expert-data-parallel group, also by 1/dp: their tokens came from
    every data-parallel rank through the dispatcher, so their local gradient already sums those ranks' losses (a run
    here feeds every rank the same batch: the dense gradients agree before the average, the experts' are dp times a
    single batch's). Then megatron's own ``_allreduce_non_tensor_model_parallel_grads``: at TP > 1 the q/k norms'
    gradients (and, with sequence parallelism, every norm's) summed over the TP ranks. DDP's buffers need CUDA here;
    its arithmetic is written out."""
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    dp = ps.get_data_parallel_world_size()
    if dp > 1:
        for p in chunk.parameters():
            if p.grad is not None:
                p.grad.div_(dp)
                torch.distributed.all_reduce(p.grad, group=ps.get_expert_data_parallel_group() if id(p) in experts
                                             else ps.get_data_parallel_group())
    wrapped = SimpleNamespace(module=chunk, ddp_config=DistributedDataParallelConfig())  # as a DDP-wrapped chunk
    _allreduce_non_tensor_model_parallel_grads([wrapped], config, ps.get_tensor_model_parallel_group())


DECODER_LAYER = re.compile(r"(?:^|\.)decoder\.layers\.(\d+)\.")  # a megatron text decoder layer's parameters


def train_layers(model: torch.nn.Module, layers, embedding: bool = False) -> int:
    """Every parameter of ``model`` outside the text decoder ``layers`` frozen (``requires_grad`` off: no gradient,
    no optimizer state), as a user freezing layers does, but the word embedding and an untied output layer when
    ``embedding``; returns how many parameters still train."""
    n = 0
    for name, p in model.named_parameters():
        m = DECODER_LAYER.search(name)
        if embedding and name.endswith(("embedding.word_embeddings.weight", "output_layer.weight")):
            pass
        elif m is None or int(m.group(1)) not in layers:
            p.requires_grad_(False)
        n += p.requires_grad
    return n


def grad_norm(pairs, experts: set[int], device) -> torch.Tensor:
    """The global gradient norm of a model sharded over several ranks, as megatron-core's optimizer computes it for
    clipping (``get_grad_norm_fp32`` on the gradients ``_get_grads_for_norm`` keeps, a dense and an expert optimizer
    chained): each rank's dense gradients, a TP-replicated parameter's (a norm, the router) on TP rank 0 only
    (``param_is_not_tensor_parallel_duplicate``), squared and summed over the model-parallel group; the experts'
    (``experts``: ids; every rank holds its own shards) over the expert tensor-model-pipeline group; the two added.
    ``pairs``: (parameter, the optimizer's main copy holding its gradient). Each element of the model counted once."""
    from megatron.core import parallel_state as ps

    first_tp = ps.get_tensor_model_parallel_rank() == 0
    dense, expert = torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    for p, main in pairs:
        if main.grad is None:
            continue
        sq = main.grad.detach().float().pow(2).sum().cpu()
        if id(p) in experts:
            expert += sq
        elif tp_unique(p, first_tp):
            dense += sq
    dense, expert = dense.to(device), expert.to(device)
    torch.distributed.all_reduce(dense, group=ps.get_model_parallel_group())
    torch.distributed.all_reduce(expert, group=ps.get_expert_tensor_model_pipeline_parallel_group())
    return (dense + expert).sqrt()


def tp_unique(p: torch.nn.Parameter, first_tp: bool) -> bool:
    """Whether a dense parameter's gradient counts in the global norm on this rank: a TP shard on every rank, a
    TP-replicated parameter on TP rank 0 only (megatron-core's ``param_is_not_tensor_parallel_duplicate``)."""
    return getattr(p, "tensor_model_parallel", False) or first_tp
