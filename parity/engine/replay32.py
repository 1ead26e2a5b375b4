"""fp32 replay of every aligned module (issue 11, item 1): math errors that bf16 rounding hides.

In a bf16 run, each module's error is judged against HF's own bf16 noise, so an error smaller than the noise
(a 1e-3 change inside a module, a 1 % expert scale behind a norm) passes. Here every aligned module is run
again in fp32 on both sides, on the same fp32 inputs, and gated by the case's fp32 gates:

- HF: each decoder layer rebuilt in fp32 from the run's HF weights (the state dict handed to the bridge; one
  layer resident at a time, as at full size), run on the fp32 reference stream -- the previous fp32 layer's
  output, starting from the captured embedding output -- with HF's own layer kwargs (its masks, its
  position ids) and HF's own rotary module in fp32; every aligned submodule's inputs and outputs are captured.
- Megatron: an fp32 copy of just that layer of the model under test, each aligned module replayed on the
  captured fp32 inputs with Megatron's *own* masks and RoPE tables (``compare.replay``), as in isolated mode.

While each HF layer is resident in fp32, every isolated record of the run also gets ``truth_rel_l2``: the
Megatron module (run dtype) against HF's module in fp32 on the same captured inputs (``_truth``).

Rows come out in mode ``fp32_replay`` (``parity.engine.gates`` gates them with the fp32 numbers). The final
norm is replayed too; the logits are not (HF's softcap is inline in its ``forward``: re-composing it here
would be the harness's code, not HF's).
"""
from __future__ import annotations

from typing import Any

import torch

from parity.engine.alignment import layer_of
from parity.engine.compare import Call, Capture, Store, capture_hf, compare_values, hf_value, replay, row_record

MODE = "fp32_replay"


def _upcast(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_upcast(v) for v in x)
    if isinstance(x, dict):
        return {k: _upcast(v) for k, v in x.items()}
    return x


def _to(x: Any, device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _sub_state(state: dict, prefix: str, device) -> dict:
    return {k[len(prefix):]: v.to(device=device, dtype=torch.float32) if v.is_floating_point() else v.to(device)
            for k, v in state.items() if k.startswith(prefix)}


def hf_layer_fp32(hf_config, state: dict, i: int, device, hf_prefix: str = "model."):
    """HF's decoder layer ``i`` in fp32, built from its class and loaded from the run's HF weights."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

    with torch.device(device):
        layer = Gemma4TextDecoderLayer(hf_config, i).float()
    missing, unexpected = layer.load_state_dict(_sub_state(state, f"{hf_prefix}layers.{i}.", device), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"fp32 replay: HF layer {i} does not fit the weights: {missing[:3]} {unexpected[:3]}")
    return layer.eval()


def mc_layer_fp32(mc_model, i: int, device):
    """An fp32 copy of just Megatron decoder layer ``i``: built from its own spec with an fp32 config, loaded
    from the model under test (its weights upcast)."""
    from parity.models.text import Gemma4TransformerLayer, layer_spec, transformer_config

    args = mc_model.args
    la = args.layers[i]
    config = transformer_config(args, la, torch.float32, str(device).split(":")[0])
    with torch.device(device):
        layer = Gemma4TransformerLayer(config, layer_spec(args.enable_moe_block), i + 1, la, args.enable_moe_block)
    src = mc_model.decoder.layers[i].state_dict()
    layer.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in src.items()
                           if not k.endswith("_extra_state")}, strict=False)
    missing = [k for k in layer.state_dict() if k not in src and not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"fp32 replay: Megatron layer {i} copy lacks {missing[:3]}")
    return layer.to(device).eval()


def mc_norm_fp32(mc_model, name: str, device):
    from parity.models.norms import Gemma4RMSNorm

    src = dict(mc_model.named_modules())[name]
    norm = Gemma4RMSNorm(src.weight.shape[0], eps=src.eps, dtype=torch.float32).to(device)
    norm.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    return norm.eval()


def fp32_replay(hf_config, hf_state: dict, mc_model, rows, hf_cap: Capture, ctx, records: list, prog=None,
                hf_prefix: str = "model.", mc_prefix: str = "") -> None:
    """Append one ``fp32_replay`` record per aligned row of every decoder layer and the final norm."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, Gemma4TextRotaryEmbedding

    device = ctx.device
    iso = {r["name"]: r for r in records if r["mode"] == "isolated"}
    by_layer: dict[int | None, list] = {}
    for hf_name, mc_name, row in rows:
        by_layer.setdefault(layer_of(hf_name), []).append((hf_name, mc_name, row))
    with torch.device(device):
        rotary = Gemma4TextRotaryEmbedding(hf_config).float()  # HF's own RoPE module, its buffers computed in fp32
    embed = hf_cap.first(f"{hf_prefix}embed_tokens")
    h = _upcast(_to(_first(embed.output) if embed is not None else None, device))
    if h is None:
        return
    for i in range(hf_config.num_hidden_layers):
        if prog is not None:
            prog.note(f"fp32 replay: layer {i + 1}/{hf_config.num_hidden_layers}")
        call = hf_cap.first(f"{hf_prefix}layers.{i}")
        if call is None:
            return
        layer32 = hf_layer_fp32(hf_config, hf_state, i, device, hf_prefix)
        kwargs = _upcast(_to(dict(call.kwargs), device))
        with torch.no_grad():
            kwargs["position_embeddings"] = rotary(h, kwargs["position_ids"], hf_config.layer_types[i])
        names = {n for n, _, _ in by_layer.get(i, [])}
        cap32, out = capture_hf(layer32, names, lambda: layer32(h, **kwargs), Store(offload=False),
                                prefix=f"{hf_prefix}layers.{i}.")
        _truth(layer32, f"{hf_prefix}layers.{i}", mc_model, by_layer.get(i, []), hf_cap, ctx, i, iso)
        mc_layer = mc_layer_fp32(_text_model(mc_model, mc_prefix), i, device)
        sub = dict(mc_layer.named_modules())
        base = f"{mc_prefix}decoder.layers.{i}"
        for hf_name, mc_name, row in by_layer.get(i, []):
            c = cap32.first(hf_name)
            module = sub.get(mc_name[len(base) + 1:] if mc_name != base else "")
            if c is None or module is None:
                records.append(_missing(hf_name, mc_name, row, hf_cap, "HF" if c is None else "Megatron"))
                continue
            with torch.no_grad():
                test = replay(row.kind, module, c, ctx, i)
            m_ = compare_values(row.kind, hf_value(row.kind, c), test, ctx)
            records.append(row_record(hf_name, mc_name, row, MODE, m_, hf_cap.order.get(hf_name, 0)))
        h = _first(out)
        del layer32, mc_layer, cap32
    norm_rows = [r for r in by_layer.get(None, []) if r[2].kind == "norm"]
    for hf_name, mc_name, row in norm_rows:
        hf_norm = Gemma4RMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps).to(device)
        hf_norm.load_state_dict(_sub_state(hf_state, f"{hf_name}.", device))
        with torch.no_grad():
            c = Call((h,), {}, hf_norm(h), 0)
            test = replay(row.kind, mc_norm_fp32(mc_model, mc_name, device), c, ctx, None)
        m_ = compare_values(row.kind, hf_value(row.kind, c), test, ctx)
        records.append(row_record(hf_name, mc_name, row, MODE, m_, hf_cap.order.get(hf_name, 0)))


def _truth(layer32, layer_name: str, mc_model, rows, hf_cap: Capture, ctx, i: int, iso: dict) -> None:
    """Accuracy against the truth (issue 11, item 2), isolated mode: each HF module in fp32 on its captured bf16
    inputs (upcast) is the truth; the Megatron module under test, in the run's dtype on the same bf16 inputs, is
    ``truth_rel_l2`` away from it -- next to the floor, HF-bf16's own distance from the same truth."""
    hf_sub = dict(layer32.named_modules())
    mc_sub = dict(mc_model.named_modules())
    for hf_name, mc_name, row in rows:
        rec, call = iso.get(hf_name), hf_cap.first(hf_name)
        rel = hf_name[len(layer_name) + 1:] if hf_name != layer_name else ""
        if rec is None or call is None or rel not in hf_sub or mc_name not in mc_sub:
            continue
        device = ctx.device
        with torch.no_grad():
            out32 = hf_sub[rel](*_upcast(_to(call.args, device)), **_upcast(_to(call.kwargs, device)))
            test = replay(row.kind, mc_sub[mc_name], call, ctx, i)
        m_ = compare_values(row.kind, hf_value(row.kind, Call((), {}, out32, 0)), test, ctx)
        rec["truth_rel_l2"] = m_["router"]["agree_weight_rel_l2"] if row.kind == "router" else m_["rel_l2"]


def _text_model(mc_model, mc_prefix: str):
    return dict(mc_model.named_modules())[mc_prefix.rstrip(".")] if mc_prefix else mc_model


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _missing(hf_name, mc_name, row, hf_cap, side: str) -> dict:
    rec = row_record(hf_name, mc_name, row, MODE, {}, hf_cap.order.get(hf_name, 0))
    rec["missing"] = f"fp32 replay: the {side} module was never called"
    return rec
