"""What a report shows, extracted from one ``results.json`` dict (its layout: ``parity.engine.results.Results``).

Pure functions on plain dicts; every optional key may be missing. The renderers (``html``, ``history``) and
the tables (``store.results_frame``) read results only through these helpers, so a change of the results
layout is absorbed here.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

from parity.engine.modes import PLOTTED

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_DECODER_OUT_RE = re.compile(r"(?:^|\.)layers\.(\d+)$")

MODES = PLOTTED  # the modes whose rows reports draw per layer, in drawing order


def num(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not a number (NaN and inf are kept)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def finite(x: Any) -> float | None:
    v = num(x)
    return v if v is not None and math.isfinite(v) else None


def modules(results: dict) -> list[dict]:
    rows = results.get("modules") or []
    return [r for r in rows if isinstance(r, dict)]


def layer_of(row: dict) -> int | None:
    """The decoder-layer index of a module row: its ``layer`` key, else parsed from ``layers.N`` in the name."""
    layer = row.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        return layer
    m = _LAYER_RE.search(str(row.get("name", "")))
    return int(m.group(1)) if m else None


def group_of(row: dict) -> str:
    group = row.get("group")
    if group:
        return str(group)
    name = str(row.get("name", ""))
    return "vision" if ("vision" in name or "embed_vision" in name) else "text"


def is_layer_output(row: dict) -> bool:
    """True for a whole-layer output row of any stack (``model.layers.3``, ``...vision_tower...layers.3``)."""
    return bool(_DECODER_OUT_RE.search(str(row.get("name", ""))))


def is_decoder_output(row: dict) -> bool:
    """True for the whole-layer output row of a text decoder layer (``model.layers.3``)."""
    return group_of(row) == "text" and bool(_DECODER_OUT_RE.search(str(row.get("name", ""))))


def row_group_label(row: dict, after_layers: bool = False) -> str:
    """Heading a module row is listed under: ``model.layers.3`` for anything inside layer 3; rows outside
    the layers go under "<group>: before the layers" (embeddings) or "<group>: after the layers" (head)."""
    name = str(row.get("name", ""))
    m = _LAYER_RE.search(name)
    if m:
        return name[:m.end(1)]
    return f"{group_of(row)}: {'after' if after_layers else 'before'} the layers"


def layer_types(results: dict) -> list[str]:
    types = results.get("layer_types") or []
    return [str(t) for t in types] if isinstance(types, list) else []


def layer_type(results: dict, layer: int | None) -> str | None:
    types = layer_types(results)
    if layer is None or not 0 <= layer < len(types):
        return None
    return types[layer]


def short_type(t: str | None) -> str:
    if not t:
        return ""
    return {"sliding_attention": "sliding", "full_attention": "full"}.get(t, t.replace("_attention", ""))


def gate_text(gate: Any) -> str:
    if not isinstance(gate, dict):
        return ""
    metric = gate.get("metric", "")
    if "max" in gate:
        return f"{metric} ≤ {fmt(gate.get('max'))}"
    if "min" in gate:
        return f"{metric} ≥ {fmt(gate.get('min'))}"
    if gate.get("exact"):
        return f"{metric} exact"
    return str(metric)


def first_divergence(results: dict) -> dict | None:
    """``summary.first_divergence_detail``, else rebuilt from ``summary.first_divergence`` and the rows.

    Returns ``{name, megatron_name, mode, metric, value, gate}`` (gate as text) or None when nothing diverged.
    """
    summary = results.get("summary") or {}
    detail = summary.get("first_divergence_detail")
    name = summary.get("first_divergence")
    if isinstance(detail, dict) and detail.get("name"):
        out = dict(detail)
        if isinstance(out.get("gate"), dict):
            out["gate"] = gate_text(out["gate"])
        elif out.get("gate") is not None and "metric" in out and num(out.get("gate")) is not None:
            out["gate"] = f"{out['metric']} ≤ {fmt(out['gate'])}"
        return out
    if not name:
        return None
    failing = [r for r in modules(results) if r.get("name") == name and r.get("passed") is False]
    rows = failing or [r for r in modules(results) if r.get("name") == name]
    if not rows:
        return {"name": name}
    row = rows[0]
    gate = row.get("gate") if isinstance(row.get("gate"), dict) else {}
    metric = gate.get("metric") or "rel_l2"
    return {"name": name, "megatron_name": row.get("megatron_name"), "mode": row.get("mode"), "metric": metric,
            "value": row.get(metric), "gate": gate_text(gate)}


def worst_layer(results: dict, mode: str | None = None) -> dict | None:
    """The decoder-layer output row with the largest rel_l2 (over both modes unless ``mode`` is given)."""
    rows = [r for r in modules(results) if is_decoder_output(r) and (mode is None or r.get("mode") == mode)]
    best, best_v = None, None
    for r in rows:
        v = num(r.get("rel_l2"))
        if v is None:
            continue
        key = math.inf if math.isnan(v) else v  # NaN is the worst there is
        if best_v is None or key > best_v:
            best, best_v = r, key
    return best


def gate_usage(row: dict) -> float | None:
    """How much of its gate a row uses: value / gate max (1 = on the gate; inf for a miss of an exact gate)."""
    gate = row.get("gate")
    if not isinstance(gate, dict) or num(gate.get("max")) is None or not gate.get("metric"):
        return None
    value, limit = num(row.get(gate["metric"])), num(gate["max"])
    if value is None or limit is None:
        return None
    if math.isnan(value):
        return math.inf
    if limit <= 0:
        return 0.0 if value <= limit else math.inf
    return value / limit


def tightest(results: dict) -> dict | None:
    """The module row closest to (or furthest past) its gate; None when every row sits at exactly 0."""
    best, best_u = None, 0.0
    for r in modules(results):
        u = gate_usage(r)
        if u is not None and u > best_u:  # rows at exactly 0 use none of their gate: never "closest"
            best, best_u = r, u
    return best


def worst_module_rel_l2(results: dict) -> float | None:
    vals = [num(r.get("rel_l2")) for r in modules(results)]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return math.inf if any(math.isnan(v) for v in vals) else max(vals)


def logits(results: dict) -> dict:
    lg = (results.get("summary") or {}).get("logits")
    return lg if isinstance(lg, dict) else {}


def module_counts(results: dict) -> tuple[int, int]:
    """(passed, total) over module rows."""
    rows = modules(results)
    return sum(1 for r in rows if r.get("passed") is True), len(rows)


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def system_of(results: dict) -> str:
    """The Megatron implementation under test: ``system.name`` (``parity`` when the results do not say)."""
    system = results.get("system")
    name = system.get("name") if isinstance(system, dict) else system
    return str(name or "parity")


def run_key(results: dict) -> tuple[str, str, str, str]:
    """Runs are comparable when case, system, device and dtype agree."""
    return (str(results.get("case", "")), system_of(results), str(results.get("device", "")),
            str(results.get("dtype", "")))


def row_key(row: dict) -> tuple[str, str, str, str]:
    """A module row's identity across runs: (HF name, Megatron name, kind, mode). One HF module can have
    several rows (its attention output and its mask are both ``model.layers.2.self_attn``; a probing row per
    probe input: its mode part names the probe)."""
    mode = str(row.get("mode") or "") + (f" [{row['probe']}]" if row.get("probe") else "")
    return (str(row.get("name", "")), str(row.get("megatron_name") or ""), str(row.get("kind") or ""), mode)


# ------------------------------------------------------------------------------------------------ format


def fmt(x: Any, digits: int = 3) -> str:
    """A number as a short string: 3 significant digits, scientific outside [1e-3, 1e5); NaN, ∞, — for None."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    v = num(x)
    if v is None:
        return str(x)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if v == 0:
        return "0"
    if v.is_integer() and abs(v) < 1e6:
        return f"{int(v):,}"
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}g}"
    mant, exp = f"{v:.{max(digits - 1, 0)}e}".split("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def fmt_cos(x: Any) -> str:
    """Cosine with enough decimals to show how far it is from 1: 0.9999587, or 1 − 2.2e-13 when very close."""
    v = num(x)
    if v is None or not math.isfinite(v):
        return fmt(x)
    gap = 1.0 - v
    if gap <= 0:
        return "1" if v == 1 else f"{v:.12g}"
    if gap < 1e-6:
        return f"1 − {gap:.1e}"
    decimals = min(9, max(4, int(math.ceil(-math.log10(gap))) + 2))
    return f"{v:.{decimals}f}"


def cos_tick(one_minus_cos: float) -> str:
    """Axis label for a tick placed at ``1 − cos`` on a log axis, written as the cosine it stands for."""
    d = one_minus_cos
    if d <= 0:
        return "1"
    k = math.floor(math.log10(d) + 1e-9)
    if d >= 1:
        return f"{1 - d:g}"
    if k >= -6:
        return f"{1 - d:.{-k}f}"
    m = d / 10 ** k
    return f"1−{m:g}e{k}"


def fmt_pct(x: Any) -> str:
    v = num(x)
    if v is None or not math.isfinite(v):
        return fmt(x)
    return f"{100 * v:.2f} %" if v < 1 else "100 %"


def fmt_seconds(x: Any) -> str:
    v = num(x)
    if v is None or not math.isfinite(v):
        return fmt(x)
    if v < 1:
        return f"{v * 1000:.0f} ms"
    if v < 120:
        return f"{v:.1f} s"
    return f"{v / 60:.1f} min"


def fmt_bytes(x: Any) -> str:
    v = num(x)
    if v is None or not math.isfinite(v):
        return fmt(x)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return fmt(x)  # pragma: no cover


def fmt_time(value: Any) -> str:
    t = parse_time(value)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if t else (str(value) if value else "—")
