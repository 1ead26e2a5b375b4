"""fp32 replay of every aligned decoder module, and accuracy against the fp32 truth (bf16 runs of one process).

In a bf16 run each module's error is judged against HF's own bf16 noise, so an error smaller than that noise
(a 2e-4 change inside a module, a 1 % expert scale behind a norm) passes, and so does a step done in bf16
where HF uses fp32 (it is "as close to HF-bf16 as HF-bf16 is to itself"). Two more measurements close both:

- ``fp32_replay`` rows: every aligned module of each text decoder layer run again in fp32 on both sides, on
  the same fp32 inputs, gated by the case's fp32 gates. HF: the decoder layer rebuilt in fp32 from its class
  and the run's HF weights (the state dict handed to the system; one layer resident at a time, as at full
  size), run on the fp32 reference stream (the previous fp32 layer's output, starting from the captured
  embedding output) with HF's own layer kwargs and HF's own rotary module in fp32, every aligned submodule's
  inputs and outputs captured. The system: just that layer of the model under test in fp32 (``System.fp32``:
  ours builds a copy from its own spec with an fp32 config; Megatron-Bridge's is upcast in place and cast
  back, bf16 -> fp32 -> bf16 being exact), each module replayed on the captured fp32 inputs as isolated replay
  runs it (its ``Replay`` plans included) with the system's *own* masks and RoPE tables (``System.replay``).
  Then the final norm the same way.
- ``truth_rel_l2`` on every isolated record of those layers: the Megatron module in the run's dtype on HF's
  captured bf16 inputs against HF's module in fp32 on the same inputs (upcast) -- the truth; its floor is
  HF-bf16's own distance from the same truth, and ``gates`` asks ``truth <= rho * floor + truth_abs``.

The logits are not replayed here: HF's softcap is inline in its ``forward``, and re-composing it would be the
harness's code, not HF's.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from parity.engine.alignment import TABLE_KINDS, Kind, Stack
from parity.engine.compare import Call, Store, capture_hf, compare, first, to_device, upcast, value
from parity.engine.kinds import layer_call
from parity.engine.system import SystemRaised

MODE = "fp32_replay"
ISOLATED = "isolated"  # the mode whose records get ``truth_rel_l2``


def _sub_state(state: dict, prefix: str, device) -> dict:
    """The weights under ``prefix``, on ``device``, floating ones in fp32. Moved first, upcast there: a host
    tensor's ``.to(cuda, float32)`` converts on the CPU and copies twice the bytes from pageable memory (at
    the 26B shape that made the fp32 replay 38 s instead of a few)."""
    return {k[len(prefix):]: v.to(device).float() if v.is_floating_point() else v.to(device)
            for k, v in state.items() if k.startswith(prefix)}


def hf_layer_fp32(text_config, state: dict, i: int, device, prefix: str):
    """HF's decoder layer ``i`` in fp32, built from its class and loaded from the run's HF weights."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

    with torch.device(device):
        layer = Gemma4TextDecoderLayer(text_config, i).float()
    missing, unexpected = layer.load_state_dict(_sub_state(state, f"{prefix}layers.{i}.", device), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"fp32 replay: HF layer {i} does not fit the weights: {missing[:3]} {unexpected[:3]}")
    return layer.eval()


def run(compared, prog) -> None:
    """Append ``fp32_replay`` records (and ``truth_rel_l2`` on the isolated ones) for every text decoder layer
    and the final norm of ``compared`` (a ``parity.engine.comparison.Comparison``): HF's layer rebuilt in fp32 from the reference's weights, the
    system's layer in fp32 (``sut.fp32``), both on HF's fp32 activations (a KV-shared layer on the fp32 K/V of
    HF's storing layer in this pass)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, Gemma4TextRotaryEmbedding

    sut, ref = compared.sut, compared.ref
    part = prog.part if prog is not None else (lambda _name: contextlib.nullcontext())
    kind, text_config, hf_state = ref.kind, ref.text_config, ref.state
    cap, device, hf_prefix = compared.cap, sut.device, kind.prefixes[Stack.TEXT]
    rows = [a for a in compared.rows if a.row.stack is Stack.TEXT and a.row.kind not in TABLE_KINDS]
    iso = {r.name: r for r in compared.records if r.mode == ISOLATED}
    embed = cap.first(f"{hf_prefix}embed_tokens")
    if embed is None:
        return
    with torch.device(device):
        rotary = Gemma4TextRotaryEmbedding(text_config).float()  # HF's own RoPE module, its buffers in fp32
    merged = cap.first("merged_embeddings") if kind.name == "vlm" else None
    h = upcast(to_device(first((merged or embed).output), device))
    n_layers = text_config.num_hidden_layers
    shared_kv: dict = {}  # KV sharing: the fp32 K/V HF's storing layers leave for the shared ones, as its forward
    for i in range(n_layers):
        if prog is not None:
            prog.note(f"fp32 replay: layer {i + 1}/{n_layers}")
        layer_name = f"{hf_prefix}layers.{i}"
        call = cap.first(layer_name)
        if call is None:
            return
        mine = [a for a in rows if a.layer == i]
        with part("hf_layer"):
            hf32 = hf_layer_fp32(text_config, hf_state, i, device, hf_prefix)
        with part("truth"):
            _truth(hf32, layer_name, mine, sut, compared, iso)
        with part("hf_forward"), torch.no_grad():
            rope = rotary(h, call.kwargs["position_ids"].to(device), text_config.layer_types[i])
            args, kwargs = layer_call(call, h, rope, device, fp32=True)
            if "shared_kv_states" in kwargs:
                kwargs["shared_kv_states"] = shared_kv
            cap32, out = capture_hf(_mounted(hf32, layer_name), mine, functools.partial(hf32, *args, **kwargs),
                                    Store(offload=False))
        layer_row = next(a for a in mine if a.row.kind is Kind.LAYER)
        with contextlib.ExitStack() as held:
            with part("system_fp32"):  # the system's layer i in fp32
                module_of = held.enter_context(sut.fp32(compared.name(layer_row)))
            with part("system_replay"):
                _replay_layer(compared, sut, mine, cap32, module_of)
        h = first(out)
        del hf32, cap32
    for a in rows:  # the final norm, on the last fp32 layer's output
        if a.row.kind is not Kind.NORM or a.hf != f"{hf_prefix}norm":  # not PLE's projection norm (before layer 0)
            continue
        name = compared.name(a)
        if not isinstance(name, str) or sut.module(name) is None:
            continue
        hf_norm = Gemma4RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps).to(device)
        hf_norm.load_state_dict(_sub_state(hf_state, f"{a.hf}.", device))
        with sut.fp32(name) as module_of, torch.no_grad():
            c = Call((h,), {}, hf_norm(h), 0)
            try:
                test = sut.replay(a, module_of(name), c)
            except SystemRaised as e:
                compared.raised(a, MODE, name, e)
                continue
            compared.record(a, MODE, value(a.row.kind, c.output), test)


def _replay_layer(compared, sut, rows, cap32, module_of) -> None:
    """Each aligned module of one layer of the system in fp32 (``module_of``) replayed on HF's fp32 captures."""
    for a in rows:
        planned = compared.replay_input(a, cap32, module_of)
        if planned is None:
            continue
        name, module, c = planned
        try:
            with torch.no_grad():
                test = sut.replay(a, module, c)
        except SystemRaised as e:
            compared.raised(a, MODE, name, e)
            continue
        if test is not None:
            compared.record(a, MODE, value(a.row.kind, c.output), test, name=name)


def _mounted(layer: torch.nn.Module, path: str) -> torch.nn.Module:
    """A bare module tree holding ``layer`` at ``path`` (e.g. ``model.layers.3``), so that its submodules carry
    their full HF names for ``capture_hf``."""
    root = cur = torch.nn.Module()
    *parents, last = path.split(".")
    for seg in parents:
        cur.add_module(seg, torch.nn.Module())
        cur = getattr(cur, seg)
    cur.add_module(last, layer)
    return root


def _truth(hf32, layer_name: str, rows, sut, compared, iso: dict) -> None:
    """``truth_rel_l2`` of each isolated record of one layer: the system's module (run dtype) on HF's captured
    inputs against HF's module in fp32 on the same inputs (upcast)."""
    subs = dict(hf32.named_modules())
    for a in rows:
        rec, call, planned = iso.get(a.hf), compared.cap.first(a.hf), compared.replay_input(a)
        rel = a.hf[len(layer_name) + 1:] if a.hf != layer_name else ""
        if rec is None or call is None or rel not in subs or planned is None or a.feeds:
            continue
        _, module, replayed = planned  # the system's module on what its isolated record was replayed on
        with torch.no_grad():
            out32 = subs[rel](*upcast(to_device(call.args, sut.device)), **upcast(to_device(call.kwargs, sut.device)))
            try:
                test = sut.replay(a, module, replayed)
            except SystemRaised:  # its isolated record already says so
                continue
        m_ = compare(a.row.kind, value(a.row.kind, out32), test, compared.where)
        rec.truth_rel_l2 = m_["router"]["agree_weight_rel_l2"] if a.row.kind is Kind.ROUTER else m_["rel_l2"]
