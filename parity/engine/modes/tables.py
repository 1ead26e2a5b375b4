"""Masks and RoPE tables, each side's own built from the raw inputs, compared as their own rows.

Their rows are written as ``end_to_end`` rows (what each side derives from the raw inputs, as in its forward):
a mask row per layer type (ordered as the first thing inside that layer's ``self_attn`` to return), a RoPE
row per layer type, and the vision encoder's mask.
"""
from __future__ import annotations

from parity.engine.alignment import TABLE_KINDS, Kind
from parity.engine.compare import compare_mask, compare_rope

MODE = "end_to_end"


def run(c, prog) -> None:
    tables, cap = c.sut.tables(), c.cap
    for a in c.rows:
        name = c.name(a)
        if a.row.kind not in TABLE_KINDS or name not in tables:
            continue
        if a.row.kind is Kind.ROPE:  # HF's rotary_emb runs once per layer type: its call of this row's type
            lt = a.slots["layer_type"]
            call = next((k for k in cap.calls.get(a.hf, []) if lt in k.args[2:3] or k.kwargs.get("layer_type") == lt),
                        None)
            if call is None:
                continue
            m_ = compare_rope(call, tables[name], c.where)
            rec = c.record(a, MODE, None, None, m_)
        else:  # the mask HF's layer received
            layer = cap.first(a.hf.rsplit(".", 1)[0])
            m_ = compare_mask(a, layer.kwargs.get("attention_mask") if layer else None, tables[name], c.where)
            rec = c.record(a, MODE, None, None, m_)
            rec.order = cap.order.get(f"{a.hf}.q_proj", cap.order.get(a.hf, 0))
        rec.detail = a.row.note.format(n=m_.get("n"), **a.slots)
