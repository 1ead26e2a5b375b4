"""Layer × module-type heatmaps of how much of its gate each module uses (one run's report), one per mode.

One heatmap per comparison mode that has rows, the replays first (isolated, then the fp32 replay, then end to
end: ``modes.rank``): a module failing in isolation is at fault itself, while end to end one fault turns every
later cell red, so the isolated map, on top, points at the cause. Rows are the module types inside a layer,
named by their HF path below ``layers.N`` (``self_attn.q_proj``, ``mlp``, ``experts``; the whole-layer output
is ``(layer output)``), in forward order; columns are the layers, full-attention layers marked. A cell is the
largest ``value / gate`` over the module's rows of that mode in that layer (every kind): 0 is grey, a use of
the gate from 1e-6 to 1 runs green → yellow → orange on a log scale, and a cell at or past its gate is red with
✗. The tooltip lists each row's metric, value and gate.
"""
from __future__ import annotations

import math
import re
from html import escape
from typing import Any

from parity.engine.modes import label, rank
from parity.report import summary as S
from parity.report.history import MATERIAL  # below this use of the gate a cell is green (growth there is drift)

DECADES = 6  # the colour scale starts at a use of 10^-DECADES of the gate
_INSIDE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.(.+))?$")
_LOW = ((0xf0, 0xfa, 0xf2), (0x8f, 0xd1, 0x9e))  # pale to mid green: 1e-6 .. 10 % of the gate
_HIGH = ((0xff, 0xf3, 0xb0), (0xfb, 0x8f, 0x44))  # yellow to orange: 10 % .. 100 % of the gate


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _mix(a: tuple[int, ...], b: tuple[int, ...], f: float) -> str:
    f = min(1.0, max(0.0, f))
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def colour(usage: float) -> str:
    """Background of a cell that uses ``usage`` of its gate (0 < usage < 1), log scale: green below
    ``MATERIAL``, yellow to orange from there to the gate."""
    lg, lm = math.log10(usage), math.log10(MATERIAL)
    if usage < MATERIAL:
        return _mix(*_LOW, (lg + DECADES) / (lm + DECADES))
    return _mix(*_HIGH, (lg - lm) / -lm)


def cells(results: dict, group: str, mode: str | None = None) -> tuple[list[str], list[int],
                                                                      dict[tuple[str, int], list[dict]]]:
    """(module types in forward order, layers, rows per (type, layer)) of the rows of ``group`` with a gate, of
    ``mode`` (every mode when None)."""
    types: list[str] = []
    layers: set[int] = set()
    grid: dict[tuple[str, int], list[dict]] = {}
    rows = sorted(S.modules(results), key=lambda r: S.num(r.get("order")) if S.num(r.get("order")) is not None
                  else math.inf)
    for r in rows:
        if S.group_of(r) != group or S.gate_usage(r) is None or (mode is not None and r.get("mode") != mode):
            continue
        m = _INSIDE.search(str(r.get("name", "")))
        if not m:
            continue
        kind, layer = m.group(2) or "(layer output)", int(m.group(1))
        if kind not in types:
            types.append(kind)
        layers.add(layer)
        grid.setdefault((kind, layer), []).append(r)
    if "(layer output)" in types:  # the whole layer last, as it returns last
        types.remove("(layer output)")
        types.append("(layer output)")
    return types, sorted(layers), grid


def _cell(rows: list[dict]) -> str:
    usage = max(S.gate_usage(r) or 0.0 for r in rows)
    tip = "\n".join(f"{r.get('mode')}{' ' + str(r['kind']) if r.get('kind') in ('mask', 'rope') else ''}: "
                    f"{(r.get('gate') or {}).get('metric')} {S.fmt(r.get((r.get('gate') or {}).get('metric')))} "
                    f"vs {S.gate_text(r.get('gate'))} ({S.fmt_pct(S.gate_usage(r))} of the gate)" for r in rows)
    name = rows[0].get("name")
    if usage >= 1:
        return f'<td class="over" title="{_e(name)}&#10;{_e(tip)}">✗</td>'
    if usage <= 0:
        return f'<td class="zero" title="{_e(name)}&#10;{_e(tip)}">·</td>'
    return f'<td style="background:{colour(usage)}" title="{_e(name)}&#10;{_e(tip)}"></td>'


def modes_of(results: dict) -> list[str]:
    """The modes with gated rows, the one of lowest rank (the isolated replay) first."""
    found = {str(r.get("mode")) for r in S.modules(results) if r.get("mode") and S.gate_usage(r) is not None}
    return sorted(found, key=lambda m: (rank(m), m))


def heatmap(results: dict, group: str = "text", mode: str | None = None) -> str:
    """The heatmap table of ``group`` (``text`` or ``vision``) in ``mode`` (every mode when None), or "" when no
    such row inside a layer has a gate."""
    types, layers, grid = cells(results, group, mode)
    if not types:
        return ""
    typed = group == "text"
    head = ['<th class="rowh"></th>']
    for j in layers:
        t = S.layer_type(results, j) if typed else None
        short = {"full_attention": "F", "sliding_attention": "S"}.get(t or "", "")
        head.append(f'<th class="{"full" if t == "full_attention" else ""}" '
                    f'title="layer {j}{": " + S.short_type(t) + " attention" if t else ""}">{j}'
                    f'{"<br>" + short if short else ""}</th>')
    body = []
    for kind in types:
        tds = "".join(_cell(grid[(kind, j)]) if (kind, j) in grid else '<td class="na"></td>' for j in layers)
        body.append(f'<tr><th class="rowh">{_e(kind)}</th>{tds}</tr>')
    return (f'<div class="tablewrap" style="padding:8px;border:0;background:none"><table class="heat" '
            f'id="heat-{_e(group)}{"-" + _e(mode) if mode else ""}"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>'
            '</div>')


WHAT = {"isolated": "each module fed HF's captured inputs: the error it adds itself",
        "fp32_replay": "both sides' layers replayed in fp32", "end_to_end": "both models on the same raw inputs: "
        "error carried from upstream"}


def section(results: dict) -> str:
    parts = []
    for mode in modes_of(results):
        maps = [(g, heatmap(results, g, mode)) for g in ("text", "vision", "audio")]
        maps = [(g, h) for g, h in maps if h]
        if not maps:
            continue
        bad = sum(1 for r in S.modules(results) if r.get("mode") == mode and r.get("passed") is False)
        count = f'<span class="red">{bad} failing</span>' if bad else '<span class="green">all within gate</span>'
        parts.append(f'<h3 class="heatmode" id="heatmap-{_e(mode)}">{_e(label(mode))} · {count}'
                     f'<span class="sub">{_e(WHAT.get(mode, ""))}</span></h3>'
                     + "".join(h if g == "text" else f'<div class="muted" style="margin:4px 0 0">{g} encoder</div>'
                               + h for g, h in maps))
    if not parts:
        return ""
    legend = ('<div class="legend">cell = largest value / gate of the module in that layer, in that mode · '
              '<span style="background:#f0f3f6;padding:0 5px;border-radius:2px">·</span> exactly 0 · '
              f'<span class="heatscale"></span> 1e-{DECADES} → {MATERIAL:.0%} → 100 % of the gate (log) · '
              '<span style="background:#cf222e;color:#fff;padding:0 4px;border-radius:2px">✗</span> at or past the '
              'gate · F full-attention layer, S sliding · hover for values</div>')
    return ('<section id="heatmap"><h2>Gate use by layer and module<span class="sub">one map per mode, the '
            'replays first: a module failing in isolation is at fault itself</span></h2><div class="card">'
            + "".join(parts) + legend + '</div></section>')
