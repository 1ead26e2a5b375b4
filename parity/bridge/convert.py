"""HF <-> Megatron conversion of the Gemma 4 text weights, driven by the table in ``mapping.py``.

Every conversion is exact: tensors are copied, sliced, concatenated or reshaped, never cast or fused,
so HF -> Megatron -> HF gives back the same bits. A transform maps HF tensors to the *full* (TP1/EP1)
Megatron tensor and back; sharding then slices that full tensor along the table's ``tp``/``ep``/``etp``
dimensions (``gated``: each rank takes its rows of both the gate and the up half).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from parity.bridge.mapping import NON_TEXT_PREFIXES, TEXT_PREFIX, expand, kv_shared_leftovers, shape, sizes
from parity.config import TextArgs
from parity.tensors import same_bits  # noqa: F401  (re-exported: tests and callers use it from here)


class BridgeError(ValueError):
    """A state dict that does not fit the mapping; the one-line message names the tensor."""


# ---------------------------------------------------------------------------------------------------
# Transforms: HF tensors <-> the full Megatron tensor. ``s`` is the size table of ``mapping.sizes``.

def pack_qkv(q: Tensor, k: Tensor, v: Tensor, s: dict[str, int]) -> Tensor:
    """Megatron's grouped layout: per KV group g, rows [its np/ng query heads; k_g; v_g]."""
    ng = s["ng"]
    q, k, v = (t.reshape(ng, -1, t.shape[-1]) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def unpack_qkv(qkv: Tensor, s: dict[str, int]) -> tuple[Tensor, Tensor, Tensor]:
    ng, hn, rep = s["ng"], s["hn"], s["np"] // s["ng"]
    q, k, v = qkv.reshape(ng, (rep + 2) * hn, -1).split([rep * hn, hn, hn], dim=1)
    return tuple(t.reshape(-1, qkv.shape[-1]) for t in (q, k, v))


def _kv_equal_to_hf(qkv: Tensor, s: dict[str, int], name: str) -> list[Tensor]:
    q, k, v = unpack_qkv(qkv, s)
    if not same_bits(k, v):
        raise BridgeError(f"{name}: V rows differ from K rows on a K=V layer (HF has no v_proj); refusing a lossy export")
    return [q, k]


def _split_gated(t: Tensor, s: dict[str, int], name: str) -> list[Tensor]:
    return list(t.chunk(2, dim=0))


def _kv_equal_grad_to_hf(qkv: Tensor, s: dict[str, int], name: str) -> list[Tensor]:
    """The adjoint of ``kv_equal``'s packing (K copied into the V rows): HF's k_proj gradient is the K rows'
    gradient plus the V rows'."""
    q, k, v = unpack_qkv(qkv, s)
    return [q, k + v]


# name -> (to Megatron: (hf tensors, sizes) -> full tensor, to HF: (full tensor, sizes, megatron name) -> hf tensors)
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda ts, s: ts[0], lambda t, s, name: [t]),
    "qkv_pack": (lambda ts, s: pack_qkv(*ts, s), lambda t, s, name: list(unpack_qkv(t, s))),
    "kv_equal": (lambda ts, s: pack_qkv(ts[0], ts[1], ts[1], s), _kv_equal_to_hf),  # V is the raw K projection
    "gated_fc1": (lambda ts, s: torch.cat(ts, dim=0), _split_gated),
    # HF's stacked experts already have Megatron's layout ([E, 2Ie, H] gate rows first; [E, H, Ie]).
    "stacked_experts_fc1": (lambda ts, s: ts[0], lambda t, s, name: [t]),
    "stacked_experts_fc2": (lambda ts, s: ts[0], lambda t, s, name: [t]),
}
# Gradients go back to HF by the adjoint of each transform: the same as the inverse, except where one HF tensor
# was copied into several Megatron places (the gradients of the copies add up).
GRAD_TO_HF: dict[str, Callable] = {**{k: v[1] for k, v in TRANSFORMS.items()}, "kv_equal": _kv_equal_grad_to_hf}


# ---------------------------------------------------------------------------------------------------
# Sharding of a full Megatron tensor along one dimension.

def shard(t: Tensor, dim: int | None, rank: int, size: int, gated: bool = False, name: str = "") -> Tensor:
    if dim is None or size == 1:
        return t
    parts = 2 * size if gated else size
    if t.shape[dim] % parts:
        raise BridgeError(f"{name}: dim {dim} of size {t.shape[dim]} does not split into {parts} equal parts")
    if gated:
        return torch.cat([half.chunk(size, dim)[rank] for half in t.chunk(2, dim)], dim)
    return t.chunk(size, dim)[rank]


def unshard(parts: list[Tensor], dim: int | None, gated: bool = False) -> Tensor:
    if dim is None or len(parts) == 1:
        return parts[0]
    if gated:
        halves = [p.chunk(2, dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(parts, dim)


def check_parallel(args: TextArgs, tp_size: int, ep_size: int, etp_size: int) -> None:
    """Refuse (one line) a parallel layout the shapes cannot split evenly."""
    problems = []
    if args.vocab_size % tp_size:
        problems.append(f"vocab_size {args.vocab_size} % TP {tp_size}")
    if args.num_heads % tp_size:
        problems.append(f"num_heads {args.num_heads} % TP {tp_size}")
    for i, layer in enumerate(args.layers):
        if layer.num_kv_heads % tp_size:
            problems.append(f"layer {i} num_kv_heads {layer.num_kv_heads} % TP {tp_size}")
            break
    if args.intermediate_size % tp_size:
        problems.append(f"intermediate_size {args.intermediate_size} % TP {tp_size}")
    if args.enable_moe_block and args.num_experts % ep_size:
        problems.append(f"num_experts {args.num_experts} % EP {ep_size}")
    if args.enable_moe_block and args.moe_intermediate_size % etp_size:
        problems.append(f"moe_intermediate_size {args.moe_intermediate_size} % ETP {etp_size}")
    if problems:
        raise BridgeError("parallel layout does not divide the model: " + ", ".join(problems))


# ---------------------------------------------------------------------------------------------------
# HF state dicts: where the text model sits.

def detect_prefix(keys) -> str:
    """Text-model prefix of an HF state dict: ``model.language_model.`` (VLM), ``model.`` (CausalLM) or ''."""
    keys = list(keys)
    if any(k.startswith(TEXT_PREFIX["Gemma4ForConditionalGeneration"]) for k in keys):
        return TEXT_PREFIX["Gemma4ForConditionalGeneration"]
    if any(k.startswith("model.") for k in keys):
        return TEXT_PREFIX["Gemma4ForCausalLM"]
    return TEXT_PREFIX["Gemma4TextModel"]


def split_hf_state(hf_state: Mapping[str, Any], prefix: str | None = None) -> tuple[str, dict, dict]:
    """``(prefix, text, other)``: ``text`` maps names relative to the text model (plus root ``lm_head.weight``)
    to values; ``other`` holds every other entry (a VLM's vision/audio keys: route them to their own bridge)."""
    prefix = detect_prefix(hf_state) if prefix is None else prefix
    text, other = {}, {}
    for key, value in hf_state.items():
        if key.startswith(prefix):
            text[key[len(prefix):]] = value
        elif key == "lm_head.weight":
            text[key] = value
        else:
            other[key] = value
    return prefix, text, other


def _full_hf_name(rule_root: bool, prefix: str, name: str) -> str:
    return name if rule_root else prefix + name


# ---------------------------------------------------------------------------------------------------
# Import and export.

def hf_to_megatron(hf_state: Mapping[str, Tensor], args: TextArgs, **ranks: int | None) -> dict[str, Tensor]:
    """The Megatron state dict of one (TP, EP, ETP) rank, from an HF text/CausalLM/VLM state dict.
    ``ranks``: ``tp_rank``, ``tp_size``, ``ep_rank``, ``ep_size``, ``etp_rank``, ``etp_size`` (all TP1/EP1
    by default; see ``iter_hf_to_megatron``).

    Exact: copies and slices of the HF tensors in their dtype. Keys outside the text model under
    ``NON_TEXT_PREFIXES`` are ignored (take them from ``split_hf_state``); any other unknown key,
    a missing key or a wrong shape raises ``BridgeError`` naming the key.
    """
    return dict(iter_hf_to_megatron(hf_state, args, **ranks))


def iter_hf_to_megatron(
    hf_state: Mapping[str, Tensor],
    args: TextArgs,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    ep_rank: int = 0,
    ep_size: int = 1,
    etp_rank: int | None = None,
    etp_size: int | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """``hf_to_megatron`` one Megatron tensor at a time, after every key and shape was checked. With
    ``device``, each HF tensor moves there just before its transform and slicing run (host-staged weights
    are sliced on the GPU, and only one tensor's worth is ever in flight)."""
    etp_size = tp_size if etp_size is None else etp_size
    if etp_rank is None:
        if etp_size not in (tp_size, 1):
            raise BridgeError(f"etp_rank is needed when ETP={etp_size} differs from TP={tp_size} and from 1")
        etp_rank = tp_rank if etp_size == tp_size else 0
    check_parallel(args, tp_size, ep_size, etp_size)
    prefix, text, other = split_hf_state(hf_state)
    stray = [k for k in other if not k.startswith(NON_TEXT_PREFIXES)]
    if stray:
        raise BridgeError(f"unexpected HF tensor {stray[0]} (not part of the Gemma 4 text model)")

    plan = []
    used: set[str] = set()
    for rule, i, hf_names, mname in expand(args):
        s = sizes(args, i)
        for name, template in zip(hf_names, rule.hf_shapes):
            full_name = _full_hf_name(rule.root, prefix, name)
            if name not in text:
                raise BridgeError(f"missing HF tensor {full_name} (needed for {mname})")
            if tuple(text[name].shape) != shape(template, s):
                raise BridgeError(f"shape mismatch for {full_name}: got {tuple(text[name].shape)}, "
                                  f"config implies {shape(template, s)}")
            used.add(name)
        plan.append((rule, s, hf_names, mname))

    if args.tie_word_embeddings and "lm_head.weight" in text:
        # In-memory HF state dicts of tied models carry lm_head sharing the embedding's storage.
        if not same_bits(text["lm_head.weight"], text["embed_tokens.weight"]):
            raise BridgeError("lm_head.weight differs from the embedding but tie_word_embeddings=True")
        used.add("lm_head.weight")
    unexpected = [k for k in text if k not in used and not k.startswith(kv_shared_leftovers(args) or ("\0",))]
    if unexpected:
        key = unexpected[0]
        raise BridgeError(f"unexpected HF tensor {_full_hf_name(key == 'lm_head.weight', prefix, key)} "
                          f"({len(unexpected)} unmapped in total)")

    def convert():
        for rule, s, hf_names, mname in plan:
            tensors = [text[n] if device is None else text[n].to(device, non_blocking=True) for n in hf_names]
            full = TRANSFORMS[rule.transform][0](tensors, s)
            local = shard(full, rule.tp, tp_rank, tp_size, rule.gated, mname)
            local = shard(local, rule.ep, ep_rank, ep_size, False, mname)
            local = shard(local, rule.etp, etp_rank, etp_size, rule.gated, mname)
            yield mname, local.contiguous()

    return convert()


ShardKey = tuple[int, ...]  # (tp_rank, ep_rank) or (tp_rank, ep_rank, etp_rank)


def _normalise_shards(shards, args: TextArgs) -> tuple[dict[tuple[int, int, int], dict], int, int, int]:
    if shards and all(isinstance(k, str) for k in shards):
        shards = {(0, 0, 0): shards}
    tp_size = 1 + max(k[0] for k in shards)
    ep_size = 1 + max(k[1] for k in shards)
    if all(len(k) == 3 for k in shards):
        return dict(shards), tp_size, ep_size, 1 + max(k[2] for k in shards)
    # (tp, ep) keys: infer ETP from the expert shapes; ETP = TP (megatron's default) or 1.
    etp_size = tp_size
    if args.enable_moe_block:
        local = next(iter(shards.values())).get("decoder.layers.0.moe.experts.linear_fc2.weight")
        if local is not None:
            etp_size = args.moe_intermediate_size // local.shape[-1]
    if etp_size not in (tp_size, 1):
        raise BridgeError(f"ETP={etp_size} differs from TP={tp_size}: key shards by (tp_rank, ep_rank, etp_rank)")
    return {(k[0], k[1], k[0] if etp_size == tp_size else 0): v for k, v in shards.items()}, tp_size, ep_size, etp_size


def megatron_to_hf(
    shards: Mapping[ShardKey, Mapping[str, Tensor]] | Mapping[str, Tensor],
    args: TextArgs,
    *,
    arch: str = "Gemma4ForCausalLM",
    tied_lm_head: bool = False,
) -> dict[str, Tensor]:
    """Gather the Megatron shards of every rank into one HF state dict for ``arch``.

    ``shards`` maps ``(tp_rank, ep_rank)`` (ETP = TP, or ETP = 1, inferred from shapes) or
    ``(tp_rank, ep_rank, etp_rank)`` to that rank's state dict; a plain TP1/EP1 state dict is accepted.
    Copies of replicated tensors must agree bit for bit. A tied ``lm_head.weight`` is omitted (as HF writes
    checkpoints) unless ``tied_lm_head`` asks for it (then it *is* the embedding tensor, as in memory).
    """
    out = dict(iter_megatron_to_hf(shards, args, arch=arch))
    if tied_lm_head and args.tie_word_embeddings and arch != "Gemma4TextModel":
        out["lm_head.weight"] = out[TEXT_PREFIX[arch] + "embed_tokens.weight"]
    return out


def iter_megatron_to_hf(
    shards: Mapping[ShardKey, Mapping[str, Tensor]] | Mapping[str, Tensor],
    args: TextArgs,
    *,
    arch: str = "Gemma4ForCausalLM",
    grads: bool = False,
    want: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """``megatron_to_hf`` one HF tensor at a time (``(name, tensor)``; a tied ``lm_head`` is never yielded),
    so a caller can check and drop each before the next is assembled. ``grads``: the tensors are gradients
    (each transform's adjoint, ``GRAD_TO_HF``). ``want``: only the Megatron tensors one of whose HF names it accepts
    are assembled (the rest are not read)."""
    shards, tp_size, ep_size, etp_size = _normalise_shards(shards, args)
    _check_known(args, [name for state in shards.values() for name in state])
    fetch = lambda mname: {key: state[mname] for key, state in shards.items() if mname in state}  # noqa: E731
    return _export(fetch, args, arch, tp_size, ep_size, etp_size, grads, want)


def _check_known(args: TextArgs, names) -> None:
    known = {mname for _, _, _, mname in expand(args)}
    for mname in names:
        if mname not in known and not mname.endswith("._extra_state"):
            raise BridgeError(f"unexpected Megatron tensor {mname}")


def _export(fetch: Callable[[str], dict], args: TextArgs, arch: str, tp_size: int, ep_size: int,
            etp_size: int, grads: bool = False, want: Callable[[str], bool] | None = None
            ) -> Iterator[tuple[str, Tensor]]:
    """The export proper: ``fetch(mname)`` gives ``{(tp, ep, etp): tensor}`` for every shard holding ``mname``
    (called once per Megatron tensor, in the table's order on every rank; ``want``, the same on every rank, skips
    the tensors none of whose HF names it accepts)."""
    if arch not in TEXT_PREFIX:
        raise BridgeError(f"unknown architecture {arch!r}; expected one of {sorted(TEXT_PREFIX)}")
    prefix = TEXT_PREFIX[arch]
    check_parallel(args, tp_size, ep_size, etp_size)
    for rule, i, hf_names, mname in expand(args):
        if want is not None and not any(want(_full_hf_name(rule.root, prefix, n)) for n in hf_names):
            continue
        s = sizes(args, i)
        found = sorted(fetch(mname).items())

        def replica(match, where: str) -> Tensor:
            hits = [t for key, t in found if match(key)]
            if not hits:
                raise BridgeError(f"missing Megatron tensor {mname} for {where}")
            if all(same_bits(hits[0], other) for other in hits[1:]):
                return hits[0]
            if grads:  # copies that disagree (a parallel bug): their mean, which they move (equal copies: exact)
                return torch.stack(hits).float().mean(0).to(hits[0].dtype)
            raise BridgeError(f"replicas of {mname} differ between ranks")

        if rule.ep is None and rule.etp is None:
            tps = range(tp_size if rule.tp is not None else 1)
            parts = [replica(lambda k, t=t: k[0] == t, f"tp_rank {t}") for t in tps]
            if rule.tp is None:
                replica(lambda k: True, "any rank")  # replicated everywhere: all copies must agree
            full = unshard(parts, rule.tp, rule.gated)
        else:
            per_ep = []
            for e in range(ep_size):
                parts = [replica(lambda k, e=e, x=x: k[1] == e and k[2] == x, f"ep_rank {e} etp_rank {x}")
                         for x in range(etp_size)]
                per_ep.append(unshard(parts, rule.etp, rule.gated))
            full = unshard(per_ep, rule.ep)
        if tuple(full.shape) != shape(rule.mcore_shape, s):
            raise BridgeError(f"shape mismatch for {mname}: gathered {tuple(full.shape)}, "
                              f"config implies {shape(rule.mcore_shape, s)}")
        to_hf = GRAD_TO_HF[rule.transform] if grads else TRANSFORMS[rule.transform][1]
        for name, t in zip(hf_names, to_hf(full, s, mname)):
            yield _full_hf_name(rule.root, prefix, name), t.contiguous()


def gather_from_world(
    local_state: Mapping[str, Tensor],
    args: TextArgs,
    *,
    arch: str = "Gemma4ForCausalLM",
    ranks: tuple[int, int, int] | None = None,
    group=None,
) -> dict[str, Tensor]:
    """Inside a torch.distributed world: gather every rank's shard and return the HF state dict on every rank
    (``iter_gather_from_world`` collected)."""
    return dict(iter_gather_from_world(local_state, args, arch=arch, ranks=ranks, group=group))


def iter_gather_from_world(
    local_state: Mapping[str, Tensor],
    args: TextArgs,
    *,
    arch: str = "Gemma4ForCausalLM",
    ranks: tuple[int, int, int] | None = None,
    group=None,
    grads: bool = False,
    want: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Inside a torch.distributed world: the HF state dict, one tensor at a time, on every rank. Each Megatron
    tensor is all-gathered on its own device (GPU shards over NCCL, CPU ones over gloo) as raw bytes, so
    only one tensor's shards are ever in flight. ``ranks`` = (tp_rank, ep_rank, etp_rank) of this process
    (default: megatron's ``parallel_state``). Data-parallel copies of one shard must agree bit for bit.
    Every rank must consume the whole iterator (each step is a collective). ``grads``: the tensors are gradients
    (each transform's adjoint); copies of one shard or of a replicated tensor that disagree give their mean.
    ``want`` (the same on every rank): only the tensors one of whose HF names it accepts are gathered."""
    import torch.distributed as dist

    if ranks is None:
        from megatron.core import parallel_state as ps

        ranks = (ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank(),
                 ps.get_expert_tensor_parallel_rank())
    keys: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(keys, tuple(ranks), group=group)
    tp_size, ep_size, etp_size = (1 + max(k[d] for k in keys) for d in range(3))
    _check_known(args, local_state)

    def fetch(mname: str) -> dict:
        if mname not in local_state:
            raise BridgeError(f"missing Megatron tensor {mname} on rank {dist.get_rank(group)}")
        t = local_state[mname].detach().contiguous()
        raw = t.reshape(-1).view(torch.uint8)
        bufs = [torch.empty_like(raw) for _ in keys]
        dist.all_gather(bufs, raw, group=group)
        got: dict = {}
        for key, buf in zip(keys, bufs):
            got.setdefault(key, []).append(buf.view(t.dtype).view(t.shape))
        for key, copies in got.items():
            if all(same_bits(copies[0], v) for v in copies[1:]):
                got[key] = copies[0]
            elif grads:
                got[key] = torch.stack(copies).float().mean(0).to(t.dtype)
            else:
                raise BridgeError(f"data-parallel copies of {mname} differ on ranks {key}")
        return got

    return _export(fetch, args, arch, tp_size, ep_size, etp_size, grads, want)


# ---------------------------------------------------------------------------------------------------
# Config: HF config -> TextArgs (+ passthrough) -> HF config.

VOLATILE_CONFIG_KEYS = ("transformers_version",)  # names the installed library, not the model


def hf_config_to_dict(config: Any) -> dict[str, Any]:
    """HF's normalised ``to_dict()`` without volatile keys (also inside sub-configs)."""
    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else v for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS}

    return clean(config.to_dict())


def _derived_kwargs(args: TextArgs) -> dict[str, Any]:
    """The HF text-config kwargs that TextArgs determines."""
    sliding = [l for l in args.layers if l.is_sliding]
    full = [l for l in args.layers if not l.is_sliding]
    for group in (sliding, full):
        if len({(l.head_dim, l.num_kv_heads, l.k_eq_v, l.rope_type, l.rope_theta, l.partial_rotary_factor)
                for l in group}) > 1:
            raise BridgeError(f"layers of type {group[0].layer_type} differ in shape or RoPE; HF cannot express that")
    kw: dict[str, Any] = dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        layer_types=[l.layer_type for l in args.layers], sliding_window=args.sliding_window,
        rms_norm_eps=args.rms_norm_eps, hidden_activation=args.hidden_activation,
        final_logit_softcapping=args.final_logit_softcapping, tie_word_embeddings=args.tie_word_embeddings,
        enable_moe_block=args.enable_moe_block, attention_bias=args.attention_bias,
        use_bidirectional_attention=args.use_bidirectional_attention, pad_token_id=args.pad_token_id,
        attention_k_eq_v=full[0].k_eq_v, global_head_dim=full[0].head_dim,
    )
    shared = [l for l in args.layers if l.kv_shared]
    kw["num_kv_shared_layers"] = len(shared)
    if shared:  # the double-wide MLP is only visible on KV-shared layers (otherwise carried as passthrough)
        kw["use_double_wide_mlp"] = any(l.intermediate_size != args.intermediate_size for l in shared)
    kw["hidden_size_per_layer_input"] = args.per_layer_size
    if args.per_layer_size:
        kw["vocab_size_per_layer_input"] = args.per_layer_vocab_size
    if args.enable_moe_block:
        kw.update(num_experts=args.num_experts, top_k_experts=args.top_k, moe_intermediate_size=args.moe_intermediate_size)
    if sliding:
        kw.update(head_dim=sliding[0].head_dim, num_key_value_heads=sliding[0].num_kv_heads)
    if full[0].k_eq_v:
        kw["num_global_key_value_heads"] = full[0].num_kv_heads
    elif sliding and sliding[0].num_kv_heads != full[0].num_kv_heads:
        raise BridgeError("full and sliding layers differ in KV heads without attention_k_eq_v; HF cannot express that")
    else:
        kw["num_key_value_heads"] = full[0].num_kv_heads
    rope = {}
    for layer in sliding[:1] + full[:1]:
        p = {"rope_type": layer.rope_type, "rope_theta": layer.rope_theta}
        if layer.rope_type == "proportional" or layer.partial_rotary_factor != 1.0:
            p["partial_rotary_factor"] = layer.partial_rotary_factor
        rope[layer.layer_type] = p
    kw["rope_parameters"] = rope
    return kw


def split_hf_config(config: Any) -> tuple[TextArgs, dict[str, Any]]:
    """``(TextArgs, passthrough)``: passthrough holds every ``to_dict()`` field TextArgs does not determine
    (e.g. max_position_embeddings, bos/eos ids, initializer_range, label maps; MoE sizes when MoE is off)."""
    config = getattr(config, "text_config", None) or config
    args = TextArgs.from_hf(config)
    derived = _derived_kwargs(args)
    d = hf_config_to_dict(config)
    passthrough = {k: v for k, v in d.items() if k not in derived and k != "per_layer_config"}
    unused_rope = {t: p for t, p in (d.get("rope_parameters") or {}).items() if t not in derived["rope_parameters"]}
    if unused_rope:  # RoPE of a layer type no layer uses
        passthrough["rope_parameters"] = unused_rope
    return args, passthrough


def args_to_hf_config(args: TextArgs, passthrough: Mapping[str, Any] | None = None):
    """Build a ``Gemma4TextConfig`` from TextArgs plus the passthrough fields of ``split_hf_config``."""
    from transformers import Gemma4TextConfig

    kw = dict(passthrough or {})
    derived = _derived_kwargs(args)
    derived["rope_parameters"] = {**kw.pop("rope_parameters", {}), **derived["rope_parameters"]}
    kw.update(derived)
    return Gemma4TextConfig.from_dict(kw)


def config_roundtrip(config: Any) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """HF config -> TextArgs + passthrough -> HF config. Returns ``(rebuilt, differences)``; differences map
    each field whose normalised value changed to ``(before, after)`` (``"TextArgs"`` if the per-layer args
    read back differ). For a ``Gemma4Config`` the text part goes through TextArgs, the rest is carried."""
    args, passthrough = split_hf_config(config)
    text = args_to_hf_config(args, passthrough)
    if getattr(config, "text_config", None) is not None:
        outer = {k: v for k, v in config.to_dict().items() if k != "text_config"}
        rebuilt = type(config).from_dict({**outer, "text_config": text.to_dict()})
    else:
        rebuilt = text
    before, after = hf_config_to_dict(config), hf_config_to_dict(rebuilt)
    diffs = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    if TextArgs.from_hf(rebuilt) != args:
        diffs["TextArgs"] = (args, TextArgs.from_hf(rebuilt))
    return rebuilt, diffs
