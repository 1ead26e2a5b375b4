"""Capture, layout alignment, isolated replay and metrics for one HF model and its Megatron twin.

HF side: forward hooks record what each aligned module *received* and *returned* (offloaded to host when
asked, deduplicated when several modules share one tensor) and the order in which modules returned.
Megatron side: the end-to-end forward is compared on the fly, hook by hook, against the stored HF
outputs (nothing of the Megatron side is kept); then each Megatron module is replayed on the HF module's
captured inputs with the Megatron model's *own* masks and RoPE tables (isolated mode).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from parity.engine import metrics as M
from parity.engine.alignment import Align, layer_of
from parity.engine.hoststage import HostStage, storage_key


# ---------------------------------------------------------------------------------------------------
# Capture

class Store:
    """Host (or device) copies of captured tensors, deduplicated by storage identity. Offloaded copies go to
    page-locked host memory asynchronously (``parity.engine.hoststage``): ``sync()`` before reading them."""

    def __init__(self, offload: bool):
        self.offload = offload
        self._seen: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
        self._host = None

    def keep(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = storage_key(x)
            hit = self._seen.get(key)
            if hit is None or hit[0]() is not x:  # a freed tensor's address may be reused: check identity
                y = x.detach()
                if self.offload and y.is_cuda:
                    if self._host is None:
                        self._host = HostStage()
                    y = self._host.put(y)
                else:
                    y = y.clone()
                self._seen[key] = (weakref.ref(x), y)
            return self._seen[key][1]
        if isinstance(x, (tuple, list)):
            return type(x)(self.keep(v) for v in x)
        if isinstance(x, dict):
            return {k: self.keep(v) for k, v in x.items()}
        return x

    def sync(self) -> None:
        if self._host is not None:
            self._host.sync()

    @property
    def host_bytes(self) -> int:
        return self._host.staged_bytes if self._host is not None else 0

    def clear(self) -> None:
        self._seen.clear()


@dataclass
class Call:
    args: tuple
    kwargs: dict
    output: Any
    order: int


@dataclass
class Capture:
    calls: dict[str, list[Call]] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # first return order of each module

    def first(self, name: str) -> Call | None:
        calls = self.calls.get(name)
        return calls[0] if calls else None


def capture_hf(model: nn.Module, names: set[str], run: Callable[[], Any], store: Store,
               keep_inputs: bool = True, prefix: str = "", cap: Capture | None = None) -> tuple[Capture, Any]:
    """Run ``run()`` with hooks on the modules of ``model`` whose ``prefix + name`` is in ``names``;
    returns the capture (``cap`` extended when given) and run()'s result."""
    cap = cap if cap is not None else Capture()
    handles = []
    for rel, mod in model.named_modules():
        name = prefix + rel if rel else prefix.rstrip(".")
        if name not in names:
            continue

        def hook(m, args, kwargs, output, name=name):
            order = len(cap.order) + 1
            cap.order.setdefault(name, order)
            cap.calls.setdefault(name, []).append(Call(
                store.keep(args) if keep_inputs else (), store.keep(kwargs) if keep_inputs else {},
                store.keep(output), order))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
        store.sync()
    return cap, result


# ---------------------------------------------------------------------------------------------------
# Layouts: bring outputs of both sides to HF's layout

@dataclass
class Ctx:
    """What both layout conversion and replay need: sizes, valid-token mask, the Megatron model's own
    masks and RoPE tables (built from raw inputs), and the Megatron model itself."""

    batch: int
    seq: int
    valid: torch.Tensor  # [b, s] bool, True = real token
    mc_model: Any
    mc_masks: dict[str, torch.Tensor]
    mc_rope: dict[str, torch.Tensor]
    layer_types: list[str]
    num_heads: int
    layer_shapes: list[tuple[int, int]]  # (head_dim, num_kv_heads) per layer
    device: Any = "cpu"


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _sb(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)


def _split_qkv(mixed: torch.Tensor, part: str, np_: int, hn: int, ng: int) -> torch.Tensor:
    """Megatron fused QKV output ``[..., ng_l*(np/ng+2)*hn]`` -> the q, k or v part ``[..., heads*hn]``."""
    rep = np_ // ng
    lead = mixed.shape[:-1]
    ng_local = mixed.shape[-1] // ((rep + 2) * hn)
    g = mixed.reshape(*lead, ng_local, (rep + 2) * hn)
    q, k, v = g.split([rep * hn, hn, hn], dim=-1)
    return {"q": q, "k": k, "v": v}[part].reshape(*lead, -1)


def hf_value(kind: str, call: Call) -> Any:
    out = call.output
    if kind == "attention":
        return out[0]
    if kind == "router":
        probs, top_w, top_i = out
        return {"probs": probs, "top_w": top_w, "top_i": top_i}
    return _first(out)


def _tp_size() -> int:
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def _tp_gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor-parallel shard along its last dim (heads / vocab / intermediate)."""
    if _tp_size() == 1:
        return x
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    return gather_from_tensor_model_parallel_region(x.contiguous())


def mc_value(kind: str, out: Any, ctx: Ctx, layer: int | None, module: nn.Module | None) -> Any:
    """Megatron end-to-end output (``[s, b, ...]``, TP shards gathered) -> HF layout."""
    b, s = ctx.batch, ctx.seq
    if kind in ("embedding", "logits"):
        return out
    if kind == "router":
        dense, _ = out
        top_w, top_i = module.last_top_k
        reorder = lambda t: t.reshape(s, b, -1).transpose(0, 1).reshape(b * s, -1)  # noqa: E731
        return {"dense": reorder(dense), "top_w": reorder(top_w), "top_i": reorder(top_i)}
    x = _first(out)
    if kind.startswith("qkv:"):
        hn, ng = ctx.layer_shapes[layer]
        x = _split_qkv(_tp_gather(x), kind[-1], ctx.num_heads, hn, ng)  # ranks hold contiguous KV groups
    elif kind.startswith("fc1:"):
        x = _tp_gather(x.chunk(2, dim=-1)[0 if kind.endswith("gate") else 1])  # [gate_r; up_r] per rank
    elif kind == "head_norm" and _tp_size() > 1 and x.shape[2] != ctx.num_heads and module is not None:
        x = _tp_gather(x.flatten(2)).unflatten(2, (-1, x.shape[-1]))
    elif kind == "lm_head":
        x = _tp_gather(x)
    x = _sb(x)
    if kind in ("experts", "flat_norm"):
        x = x.reshape(b * s, -1)
    return x


# ---------------------------------------------------------------------------------------------------
# Isolated replay: the Megatron module on the HF module's captured inputs, with Megatron's own masks/RoPE

def _arg(call: Call, key: str, pos: int = 0):
    if key in call.kwargs:
        return call.kwargs[key]
    return call.args[pos]


def replay(kind: str, module: nn.Module, call: Call, ctx: Ctx, layer: int | None) -> Any:
    """``module`` on ``call``'s inputs in HF layout; for ``logits`` the call is the final norm's (its output
    is the input of lm_head + softcap, which are not an HF module)."""
    dev = ctx.device
    x = lambda key="hidden_states", pos=0: _arg(call, key, pos).to(dev)  # noqa: E731
    lt = ctx.layer_types[layer] if layer is not None else None
    if kind == "embedding":
        return module(_arg(call, "input_ids").to(dev))
    if kind in ("norm", "head_norm"):
        return _sb(module(_sb(x())))
    if kind == "flat_norm":
        return module(x())
    if kind == "layer":
        return _sb(module(_sb(x()), ctx.mc_masks[lt], ctx.mc_rope[lt]))
    if kind == "attention":
        return _sb(module(_sb(x()), ctx.mc_masks[lt], rotary_pos_emb=ctx.mc_rope[lt])[0])
    if kind == "linear" and getattr(module, "input_is_parallel", False) and _tp_size() > 1:
        from megatron.core import parallel_state  # row-parallel: this rank's slice of the HF input
        local = x("input").chunk(_tp_size(), dim=-1)[parallel_state.get_tensor_model_parallel_rank()]
        return mc_value(kind, module(_sb(local)), ctx, layer, module)
    if kind.startswith("qkv:") or kind.startswith("fc1:") or kind in ("linear", "mlp"):
        return mc_value(kind, module(_sb(x("input"))), ctx, layer, module)
    if kind == "router":
        dense, _ = module(x())
        top_w, top_i = module.last_top_k
        return {"dense": dense, "top_w": top_w, "top_i": top_i}
    if kind == "experts":  # forced identical routing: HF's top-k indices and weights
        h = x()
        top_i, top_w = _arg(call, "top_k_index", 1).to(dev), _arg(call, "top_k_weights", 2).to(dev)
        probs = torch.zeros(h.shape[0], module.config.num_moe_experts, dtype=top_w.dtype, device=dev)
        probs.scatter_(1, top_i, top_w)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_i, True)
        return module.experts_forward(h[:, None, :], probs, routing_map)[:, 0, :]
    if kind == "lm_head":
        weight = ctx.mc_model.embedding.word_embeddings.weight if ctx.mc_model.args.tie_word_embeddings else None
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
        out, _ = module(_sb(x("input")), weight=weight)
        return _sb(gather_from_tensor_model_parallel_region(out))
    if kind == "logits":
        return ctx.mc_model.output_logits(_sb(_first(call.output).to(dev)))
    raise ValueError(f"no replay for kind {kind}")


# ---------------------------------------------------------------------------------------------------
# Metrics of one aligned pair

def valid_for(kind: str, ctx: Ctx) -> torch.Tensor:
    return ctx.valid.reshape(-1) if kind in ("experts", "flat_norm", "router") else ctx.valid


def compare_values(kind: str, ref: Any, test: Any, ctx: Ctx) -> dict:
    mask = valid_for(kind, ctx)
    if kind == "router":
        e = ref["probs"].shape[-1]
        ref_dense = torch.zeros_like(ref["probs"]).scatter(1, ref["top_i"].long(), ref["top_w"].float())
        test_dense = test["dense"].to(ref_dense.device, ref_dense.dtype)
        out = M.tensor_metrics(ref_dense, test_dense, mask.to(ref_dense.device))
        out["router"] = M.router_metrics(
            ref["top_i"].cpu(), test["top_i"].cpu(), ref["top_w"].cpu(), test["top_w"].cpu(),
            mask=mask.cpu(), ref_probs=ref["probs"].cpu())
        out["router"]["num_experts"] = e
        return out
    ref_t = ref.to(test.device) if isinstance(ref, torch.Tensor) else ref
    return M.tensor_metrics(ref_t, test, mask.to(test.device))


def row_record(hf_name: str, mc_name: str, row: Align, mode: str, m: dict, order: int) -> dict:
    rec = {
        "name": hf_name, "megatron_name": mc_name, "mode": mode, "kind": row.kind,
        "cosine": m.get("cosine"), "rel_l2": m.get("rel_l2"), "max_abs": m.get("max_abs"),
        "p99_abs": m.get("p99_abs"), "nonfinite": (m.get("nonfinite_ref", 0), m.get("nonfinite_test", 0)),
        "layer": layer_of(hf_name), "order": order, "gate_class": row.gate,
    }
    if "router" in m:
        rec["router"] = m["router"]
    return rec
