"""Small inline-SVG charts for the reports: a layer-depth line chart, grouped bars and sparklines.

No dependencies and no scripts: each function returns one ``<svg>`` element as a string, sized by its
``viewBox`` so it scales with the page. Every text that reaches the SVG is escaped here. Hover tooltips use
SVG ``<title>`` elements.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape

FAIL = "#cf222e"
GRID = "#d0d7de"
AXIS = "#57606a"
BAND = "#eef1f6"


@dataclass
class Point:
    x: float
    y: float | None  # None: no value; NaN/inf: drawn at the top edge as a failure
    tip: str = ""
    failed: bool = False
    full: bool = False  # square marker (full-attention layer) instead of a circle


@dataclass
class Series:
    label: str
    color: str
    points: list[Point] = field(default_factory=list)
    dash: str = ""


def _e(s: object) -> str:
    return escape(str(s), quote=True)


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


def _linear_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    if hi <= lo:
        pad = abs(hi) * 1e-6 or 1e-6
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    start = math.floor(lo / step) * step
    end = math.ceil(hi / step) * step
    ticks, t = [], start
    while t <= end + step * 1e-9:
        ticks.append(round(t / step) * step)
        t += step
    return start, end, ticks


def _tick_label(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if step >= 1 and abs(v) < 1e6:
        return f"{v:.0f}"
    decimals = max(0, -int(math.floor(math.log10(step))))
    if decimals <= 7:
        return f"{v:.{decimals}f}"
    return f"{v:.2e}"


def _log_label(v: float) -> str:
    k = math.floor(math.log10(v) + 1e-9)
    m = round(v / 10.0 ** k)
    return f"{m}" if k == 0 else f"{m}e{k}"


def line_chart(series: list[Series], *, title: str, y_label: str, x_label: str = "layer",
               log_y: bool = False, full_layers: set[int] | frozenset[int] = frozenset(),
               width: int = 600, height: int = 250, y_floor: float | None = None,
               log_label: Callable[[float], str] | None = None, zero_note: str = "every value is exactly 0") -> str:
    """Values against layer depth. Full-attention layers get a shaded band and square markers.

    ``y_label`` names the axis for screen readers (the title carries it visibly).

    On a log axis, zeros sit on the bottom edge (hollow marker) and NaN/inf on the top edge (red cross);
    ``log_label`` writes its tick labels (default ``1e-3``).
    """
    ml, mr, mt, mb = 64, 14, 30, 38
    x0, x1, y0, y1 = ml, width - mr, mt, height - mb
    xs = [p.x for s in series for p in s.points]
    if not xs:
        return ""
    xmin, xmax = min(xs) - 0.5, max(xs) + 0.5
    vals = [p.y for s in series for p in s.points if p.y is not None and math.isfinite(p.y)]

    if log_y:
        pos = [v for v in vals if v > 0]
        if y_floor is not None:
            pos = [max(v, y_floor) for v in pos]
        lo_k = math.floor(math.log10(min(pos))) if pos else -16
        hi_k = math.ceil(math.log10(max(pos))) if pos else -12
        if hi_k <= lo_k:
            hi_k = lo_k + 1
        ymin, ymax = 10.0 ** lo_k, 10.0 ** hi_k
        every = max(1, math.ceil((hi_k - lo_k) / 7))
        ticks = [10.0 ** k for k in range(hi_k, lo_k - 1, -every)]
        if hi_k - lo_k <= 2:  # few decades: label 2x and 5x too
            ticks += [m * 10.0 ** k for k in range(lo_k, hi_k) for m in (2, 5)]
        labels = [log_label(t) if log_label else _log_label(t) for t in ticks]

        def ty(v: float) -> float:
            v = min(max(v, ymin), ymax)
            return y1 - (math.log10(v) - lo_k) / (hi_k - lo_k) * (y1 - y0)
    else:
        lo = min(vals) if vals else 0.0
        hi = max(vals) if vals else 1.0
        ymin, ymax, ticks = _linear_ticks(lo, hi)
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        labels = [_tick_label(t, step) for t in ticks]

        def ty(v: float) -> float:
            return y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

    def tx(x: float) -> float:
        return x0 + (x - xmin) / (xmax - xmin) * (x1 - x0)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}, y: {_e(y_label)}">',
           f'<text class="ct" x="{x0}" y="16">{_e(title)}</text>']
    # full-attention bands
    for layer in sorted(full_layers):
        if xmin < layer < xmax:
            bx0, bx1 = tx(layer - 0.5), tx(layer + 0.5)
            out.append(f'<rect x="{bx0:.1f}" y="{y0}" width="{bx1 - bx0:.1f}" height="{y1 - y0}" fill="{BAND}">'
                       f'<title>layer {layer}: full attention</title></rect>')
    # grid and y labels
    for t, lab in zip(ticks, labels):
        y = ty(t)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}" stroke-width="0.6"/>')
        out.append(f'<text class="tl" x="{x0 - 6}" y="{y + 3.5:.1f}" text-anchor="end">{_e(lab)}</text>')
    # x labels: every layer when few, else a stride
    lo_x, hi_x = int(math.ceil(xmin)), int(math.floor(xmax))
    stride = max(1, math.ceil((hi_x - lo_x + 1) / 16))
    for x in range(lo_x, hi_x + 1):
        if (x - lo_x) % stride == 0:
            out.append(f'<text class="tl" x="{tx(x):.1f}" y="{y1 + 14}" text-anchor="middle">{x}</text>')
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{y1}" y2="{y1}" stroke="{AXIS}" stroke-width="0.8"/>')
    out.append(f'<text class="tl" x="{(x0 + x1) / 2:.1f}" y="{height - 6}" text-anchor="middle">{_e(x_label)}</text>')
    # series
    for s in series:
        pts = sorted(s.points, key=lambda p: p.x)
        run: list[str] = []
        segments: list[list[str]] = []
        for p in pts:
            if p.y is None or not math.isfinite(p.y) or (log_y and p.y <= 0):
                if run:
                    segments.append(run)
                run = []
                continue
            run.append(f"{tx(p.x):.1f},{ty(p.y):.1f}")
        if run:
            segments.append(run)
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        for seg in segments:
            if len(seg) > 1:
                out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{s.color}" '
                           f'stroke-width="1.8"{dash}/>')
        for p in pts:
            if p.y is None:
                continue
            cx = tx(p.x)
            tip = f"<title>{_e(p.tip)}</title>" if p.tip else ""
            if not math.isfinite(p.y):
                cy = y0 + 2
                out.append(f'<g stroke="{FAIL}" stroke-width="2"><line x1="{cx - 4:.1f}" y1="{cy - 4:.1f}" '
                           f'x2="{cx + 4:.1f}" y2="{cy + 4:.1f}"/><line x1="{cx - 4:.1f}" y1="{cy + 4:.1f}" '
                           f'x2="{cx + 4:.1f}" y2="{cy - 4:.1f}"/>{tip}</g>')
                continue
            hollow = log_y and p.y <= 0
            cy = y1 if hollow else ty(p.y)
            fill = "#fff" if hollow else s.color
            if p.failed:
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="7" fill="none" stroke="{FAIL}" '
                           f'stroke-width="1.8"/>')
            if p.full:
                out.append(f'<rect x="{cx - 4:.1f}" y="{cy - 4:.1f}" width="8" height="8" fill="{fill}" '
                           f'stroke="{s.color}" stroke-width="1.2">{tip}</rect>')
            else:
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.8" fill="{fill}" stroke="{s.color}" '
                           f'stroke-width="1.2">{tip}</circle>')
    if log_y and not pos and any(p.y == 0 for s in series for p in s.points):
        out.append(f'<text class="tl" x="{(x0 + x1) / 2:.1f}" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" '
                   f'style="font-size:13px">{_e(zero_note)}</text>')
    # legend (top right)
    lx = x1
    items = [(s.label, s.color, s.dash) for s in series]
    legend: list[str] = []
    for label, color, dash in reversed(items):
        w = 26 + 6.2 * len(label)
        lx -= w
        d = f' stroke-dasharray="{dash}"' if dash else ""
        legend.append(f'<line x1="{lx:.1f}" x2="{lx + 16:.1f}" y1="12" y2="12" stroke="{color}" '
                      f'stroke-width="2"{d}/><text class="tl" x="{lx + 20:.1f}" y="15.5">{_e(label)}</text>')
    out.extend(legend)
    out.append("</svg>")
    return "".join(out)


def bar_chart(categories: list[str], series: list[Series], *, title: str, y_label: str,
              y_max: float = 1.0, width: int = 600, height: int = 220, highlight: set[int] | None = None) -> str:
    """Grouped vertical bars on a 0..y_max axis; ``series[i].points[j].y`` is the bar of category j.

    Categories in ``highlight`` get a red label (e.g. layers with decisive routing flips).
    """
    if not categories or not series:
        return ""
    ml, mr, mt, mb = 40, 14, 30, 38
    x0, x1, y0, y1 = ml, width - mr, mt, height - mb
    n, k = len(categories), len(series)
    slot = (x1 - x0) / n
    bw = max(1.5, min(18.0, slot * 0.8 / k))

    def ty(v: float) -> float:
        return y1 - max(0.0, min(v, y_max)) / y_max * (y1 - y0)

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}, y: {_e(y_label)}">',
           f'<text class="ct" x="{x0}" y="16">{_e(title)}</text>']
    for i in range(6):
        t = y_max * i / 5
        y = ty(t)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}" stroke-width="0.6"/>')
        out.append(f'<text class="tl" x="{x0 - 6}" y="{y + 3.5:.1f}" text-anchor="end">{t:.1f}</text>')
    stride = max(1, math.ceil(n / 16))
    for j, cat in enumerate(categories):
        cx = x0 + slot * (j + 0.5)
        for i, s in enumerate(series):
            p = s.points[j] if j < len(s.points) else None
            if p is None or p.y is None:
                continue
            bx = cx - k * bw / 2 + i * bw
            v = p.y if math.isfinite(p.y) else 0.0
            tip = f"<title>{_e(p.tip)}</title>" if p.tip else ""
            out.append(f'<rect x="{bx:.1f}" y="{ty(v):.1f}" width="{bw - 1:.1f}" height="{y1 - ty(v):.1f}" '
                       f'fill="{FAIL if p.failed else s.color}">{tip}</rect>')
        if j % stride == 0:
            cls = "tl bad" if highlight and j in highlight else "tl"
            out.append(f'<text class="{cls}" x="{cx:.1f}" y="{y1 + 14}" text-anchor="middle">{_e(cat)}</text>')
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{y1}" y2="{y1}" stroke="{AXIS}" stroke-width="0.8"/>')
    out.append(f'<text class="tl" x="{(x0 + x1) / 2:.1f}" y="{height - 6}" text-anchor="middle">layer</text>')
    lx = x1
    for s in reversed(series):
        lx -= 26 + 6.2 * len(s.label)
        out.append(f'<rect x="{lx:.1f}" y="7" width="12" height="10" fill="{s.color}"/>'
                   f'<text class="tl" x="{lx + 16:.1f}" y="15.5">{_e(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)


def sparkline(values: list[float | None], *, failed: list[bool] | None = None, tips: list[str] | None = None,
              log_y: bool = True, width: int = 150, height: int = 34, color: str = "#0969da") -> str:
    """A tiny trend line (oldest left). Failing runs are red dots; NaN/inf are red dots on the top edge."""
    n = len(values)
    if n == 0:
        return '<span class="muted">—</span>'
    pad = 4

    def key(v: float) -> float:
        return math.log10(v) if log_y else v

    usable = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    if usable:
        lo, hi = min(key(v) for v in usable), max(key(v) for v in usable)
    else:
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def tx(i: int) -> float:
        return pad + (i / (n - 1) if n > 1 else 0.5) * (width - 2 * pad)

    def ty(v: float | None) -> float:
        if v is None or not math.isfinite(v):
            return pad
        if log_y and v <= 0:
            return height - pad
        return height - pad - (key(v) - lo) / (hi - lo) * (height - 2 * pad)

    pts = [(tx(i), ty(v)) for i, v in enumerate(values) if v is not None]
    out = [f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" height="{height}">']
    if len(pts) > 1:
        out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}" fill="none" '
                   f'stroke="{color}" stroke-width="1.4"/>')
    for i, v in enumerate(values):
        if v is None:
            continue
        bad = (failed[i] if failed and i < len(failed) else False) or not math.isfinite(v)
        last = i == n - 1
        if bad or last or n <= 12:
            r = 2.8 if last else 2.0
            tip = f"<title>{_e(tips[i])}</title>" if tips and i < len(tips) else ""
            out.append(f'<circle cx="{tx(i):.1f}" cy="{ty(v):.1f}" r="{r}" fill="{FAIL if bad else color}">'
                       f'{tip}</circle>')
    out.append("</svg>")
    return "".join(out)
