"""Isolated replay: each module of the system on the HF module's captured inputs (activations only; masks
and RoPE are the system's own), inline steps on the captured outputs of the modules that feed them.

Floors: each HF module in fp32 on its own (upcast) captured inputs; inline steps (lm_head + softcap, the
image and audio scatters) as HF computes them, on the upcast outputs of the modules that feed them (the text logits
through HF's own forward: the model kind's ``head_fp32``).
"""
from __future__ import annotations

import copy
import re
from typing import Any

import torch

from parity.engine.alignment import TABLE_KINDS, Kind
from parity.engine.compare import Call, first, floor_value, to_device, upcast, value
from parity.engine.system import SystemRaised

MODE = "isolated"


def run(c, prog) -> None:
    last, n_layers = None, sum(a.row.kind is Kind.LAYER and a.group() == "text" for a in c.rows)
    for a in c.rows:
        if a.group() == "text" and a.layer is not None and a.layer != last:
            prog.note(f"isolated replay: layer {a.layer + 1}/{n_layers}")
            last = a.layer
        planned = c.replay_input(a)
        if planned is None:
            continue
        name, module, replayed = planned
        try:
            with torch.no_grad():
                test = c.sut.replay(a, module, replayed)
        except SystemRaised as e:  # a verdict about this module, the other rows still replay
            c.raised(a, MODE, name, e)
            continue
        if test is None:  # the system cannot run this module alone (e.g. a norm fused into the next linear)
            c.not_run(a, MODE, name, f"{c.sut.name} cannot run {name} alone: compared end to end only")
            continue
        rec = c.record(a, MODE, value(a.row.kind, replayed.output), test, name=name)
        plan = c.sut.replays.get(a.row.name_key)
        if plan is not None and plan.why:
            rec.detail = plan.why


def fp32_module(module, call, device) -> Any:
    """An fp32 copy of the HF ``module`` on its own (upcast) captured inputs."""
    return _run32(copy.deepcopy(module).float(), call, device)


def _run32(mod32, call, device) -> Any:
    with torch.no_grad():
        return mod32(*upcast(to_device(call.args, device)), **upcast(to_device(call.kwargs, device)))


_IN_LAYER = re.compile(r"^(.*\.layers\.\d+)(?:\.(.+))?$")  # a module inside (or being) a layer of any stack


class _Fp32Layers:
    """fp32 copies of HF's modules for the floors: the rows of one layer (the layer, its attention, MLP, experts,
    norms, ...) all run on one fp32 copy of that layer, held until a row of another layer comes (one at a time, as
    the fp32 copy of a layer row alone was); a module outside every layer is copied alone. One copy per layer instead
    of one per row: at 26B a layer's rows copied its experts three times (layer, MoE block, experts)."""

    def __init__(self, modules: dict):
        self.modules, self.layer, self.subs = modules, None, {}

    def __call__(self, path: str):
        m = _IN_LAYER.match(path)
        if m is None:
            return copy.deepcopy(self.modules[path]).float()
        if m.group(1) != self.layer:
            self.layer, self.subs = None, {}  # the previous copy goes before the next is made
            self.subs = dict(copy.deepcopy(self.modules[m.group(1)]).float().named_modules())
            self.layer = m.group(1)
        return self.subs[m.group(2) or ""]


def floors(ref, prog) -> dict[str, float]:
    hf_model, cap, device, out = ref.model, ref.cap, ref.device, {}
    modules = dict(hf_model.named_modules())  # once: at 26B, per row it was 3.4 million lookups
    fp32_of = _Fp32Layers(modules)
    in_layer = lambda a: (m.group(1) if (m := _IN_LAYER.match(a.hf)) else "")  # noqa: E731
    for a in sorted(ref.rows, key=in_layer):  # a layer's rows together (the vision rows come type by type); stable
        kind, call = a.row.kind, cap.first(a.hf)
        if kind in TABLE_KINDS or a.hf in out or call is None:
            continue
        feeds = [cap.first(n) for n in a.feeds]
        if None in feeds:
            continue
        if kind is Kind.LOGITS:
            if cap.first("lm_head") is None:
                continue
            head = lambda x: first(fp32_module(modules["lm_head"], Call((x,), {}, None, 0), device))  # noqa: E731
            out32 = ref.kind.head_fp32(hf_model, first(feeds[0].output).to(device).float(), ref.inputs, head)
        elif kind is Kind.MERGED:  # HF's inline merge: the image scatter, then the audio one at the real frames
            emb, feats, *audio = (first(f.output).to(device).float() for f in feeds)  # captures may be on the host
            ids = ref.inputs["input_ids"]
            out32 = emb.masked_scatter((ids == ref.config.image_token_id)[..., None].expand_as(emb), feats)
            if audio:
                out32 = out32.masked_scatter((ids == ref.config.audio_token_id)[..., None].expand_as(emb),
                                             audio[0][ref.where.audio.to(audio[0].device)])
        else:
            try:
                out32 = _run32(fp32_of(a.hf), call, device)
            except Exception:  # a module that cannot be re-run alone gets no floor: its gate is floor_abs only
                continue
        out[a.hf] = floor_value(kind, out32, call.output, ref.where)
    return out
