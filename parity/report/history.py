"""Run history: regression flags between two runs and the ``reports/index.html`` that lists every run.

``compare(current, previous)`` is the single definition of a regression; the run report and the index both
call it. A run's *previous* run is the most recent earlier run with the same case, device and dtype.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from html import escape
from typing import Any

from parity.report import summary as S
from parity.report.page import page
from parity.report.svg import sparkline

GROWTH = 2.0  # a module's rel_l2 growing by at least this factor is a regression
ABS_FLOOR = 1e-12  # rel_l2 below this counts as zero (no 0 -> 1e-15 noise flags)

_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _flag(kind: str, severity: str, message: str, **extra: Any) -> dict:
    return {"kind": kind, "severity": severity, "message": message, **extra}


def _grew(cur: float | None, prev: float | None) -> bool:
    if cur is None or prev is None:
        return False
    if math.isnan(cur) or math.isinf(cur):
        return math.isfinite(prev)
    if not math.isfinite(prev):
        return False
    return cur >= GROWTH * max(prev, ABS_FLOOR)


def _factor(cur: float, prev: float) -> float | None:
    if not math.isfinite(cur) or prev <= 0 or not math.isfinite(prev):
        return None
    return cur / prev


def compare(current: dict, previous: dict | None) -> list[dict]:
    """Regression flags of ``current`` against ``previous`` (None: no flags).

    Each flag is ``{kind, severity, message, ...}``:
    - ``kind="verdict"``: the verdict flipped; severity ``regression`` (PASS → FAIL) or ``improvement``
      (FAIL → PASS).
    - ``kind="rel_l2"``: a module row (same ``name`` and ``mode``) whose rel_l2 grew ≥ 2× (values below 1e-12
      count as 1e-12; a finite value turning NaN/inf counts); extra keys ``name``, ``megatron_name``, ``mode``,
      ``previous``, ``current``, ``factor`` (None when the previous value was 0), ``now_failing``.
    - ``kind="gate"``: a module row that passed its gate before and fails it now without a 2× growth.
    Verdict first, then modules that now fail their gate, then by growth factor, largest first.
    """
    if not previous:
        return []
    flags: list[dict] = []
    p_pass, c_pass = previous.get("passed"), current.get("passed")
    if p_pass is True and c_pass is False:
        flags.append(_flag("verdict", "regression", "verdict PASS → FAIL", previous=True, current=False))
    elif p_pass is False and c_pass is True:
        flags.append(_flag("verdict", "improvement", "verdict FAIL → PASS", previous=False, current=True))

    before = {(r.get("name"), r.get("mode")): r for r in S.modules(previous)}
    rows = S.modules(current)
    if not any(r.get("name") == "logits" for r in rows):
        cur_lg, prev_lg = S.logits(current), S.logits(previous)
        if "rel_l2" in cur_lg and "rel_l2" in prev_lg:
            rows = rows + [{"name": "logits", "mode": "summary", "rel_l2": cur_lg["rel_l2"]}]
            before[("logits", "summary")] = {"name": "logits", "mode": "summary", "rel_l2": prev_lg["rel_l2"]}
    growth: list[dict] = []
    for row in rows:
        key = (row.get("name"), row.get("mode"))
        old = before.get(key)
        if old is None:
            continue
        cur, prev = S.num(row.get("rel_l2")), S.num(old.get("rel_l2"))
        now_failing = row.get("passed") is False and old.get("passed") is True
        common = {"name": row.get("name"), "megatron_name": row.get("megatron_name"), "mode": row.get("mode"),
                  "previous": prev, "current": cur}
        if _grew(cur, prev):
            factor = _factor(cur, prev)  # type: ignore[arg-type]
            how = f"{S.fmt(factor)}×" if factor is not None else "from ~0" if math.isfinite(cur) else "to non-finite"
            msg = f"{row.get('name')} [{row.get('mode')}] rel_l2 {S.fmt(prev)} → {S.fmt(cur)} ({how})"
            growth.append(_flag("rel_l2", "regression", msg + (", now failing" if now_failing else ""),
                                factor=factor, now_failing=now_failing, **common))
        elif now_failing:
            msg = f"{row.get('name')} [{row.get('mode')}] now fails its gate (rel_l2 {S.fmt(prev)} → {S.fmt(cur)})"
            growth.append(_flag("gate", "regression", msg, factor=_factor(cur, prev) if cur is not None and
                                prev is not None else None, now_failing=True, **common))
    growth.sort(key=lambda f: (not f["now_failing"], -(f["factor"] if f.get("factor") is not None else math.inf),
                               str(f.get("name"))))
    return flags + growth


def run_time(results: dict) -> datetime:
    return S.parse_time(results.get("created")) or _EPOCH


def _order_key(results: dict) -> tuple[datetime, str]:
    return run_time(results), str((results.get("_run") or {}).get("id", ""))


def find_previous(current: dict, runs: list[dict]) -> dict | None:
    """The most recent run in ``runs`` earlier than ``current`` with the same case, device and dtype."""
    key, me = S.run_key(current), _order_key(current)
    earlier = [r for r in runs if r is not current and S.run_key(r) == key and _order_key(r) < me]
    return max(earlier, key=_order_key) if earlier else None


def previous_map(runs: list[dict]) -> dict[int, dict | None]:
    """``id(run) -> previous run`` for every run of ``runs``."""
    by_key: dict[tuple, list[dict]] = {}
    for r in runs:
        by_key.setdefault(S.run_key(r), []).append(r)
    out: dict[int, dict | None] = {}
    for group in by_key.values():
        group.sort(key=_order_key)
        for i, r in enumerate(group):
            out[id(r)] = group[i - 1] if i else None
    return out


# ---------------------------------------------------------------------------------------------- rendering


def _verdict_pill(passed: Any) -> str:
    if passed is True:
        return '<span class="pill ok big">PASS</span>'
    if passed is False:
        return '<span class="pill no big">FAIL</span>'
    return '<span class="pill warn big">?</span>'


def _num_td(v: Any, bad: bool = False) -> str:
    x = S.num(v)
    dv = "" if x is None else repr(x)
    return f'<td class="n{" red" if bad else ""}" data-v="{_e(dv)}">{_e(S.fmt(v))}</td>'


def _regression_cell(flags: list[dict], has_previous: bool) -> tuple[str, int]:
    """Compact cell: a count pill and the most important flag on one line; the full list in the tooltip."""
    if not has_previous:
        return '<span class="muted">first run</span>', 0
    bad = [f for f in flags if f["severity"] == "regression"]
    good = [f for f in flags if f["severity"] == "improvement"]
    parts = []
    if bad:
        tip = "\n".join(f["message"] for f in bad[:40]) + (f"\n… {len(bad) - 40} more" if len(bad) > 40 else "")
        parts.append(f'<span class="pill no">{len(bad)} regression{"s" if len(bad) != 1 else ""}</span>'
                     f'<div class="one" title="{_e(tip)}">{_e(bad[0]["message"])}</div>')
        if len(bad) > 1:
            parts.append(f'<div class="one" title="{_e(tip)}">{_e(bad[1]["message"])}</div>')
    if good:
        parts.append('<span class="pill ok">' + _e("; ".join(f["message"] for f in good)) + '</span>')
    return ("".join(parts) or '<span class="muted">none</span>'), len(bad)


def _trend_card(key: tuple[str, str, str], group: list[dict]) -> str:
    group = sorted(group, key=_order_key)[-40:]  # oldest → newest, last 40 runs
    latest = group[-1]
    failed = [r.get("passed") is False for r in group]
    times = [S.fmt_time(r.get("created")) for r in group]
    metrics = [
        ("logits rel_l2", [S.num(S.logits(r).get("rel_l2")) for r in group]),
        ("logits KL max", [S.num(S.logits(r).get("kl_max")) for r in group]),
        ("worst module rel_l2", [S.worst_module_rel_l2(r) for r in group]),
    ]
    rows = []
    for label, values in metrics:
        tips = [f"{t}: {S.fmt(v)}" for t, v in zip(times, values)]
        rows.append(f'<div class="spk"><span class="muted">{_e(label)}</span>'
                    f'{sparkline(values, failed=failed, tips=tips)}'
                    f'<span class="mono">{_e(S.fmt(values[-1]))}</span></div>')
    dots = "".join(f'<i class="{"no" if f else ""}" title="{_e(t)}: {"FAIL" if f else "PASS"}"></i>'
                   for f, t in zip(failed, times))
    case, device, dtype = key
    return (f'<div class="card {"bad" if latest.get("passed") is False else "good"}">'
            f'<div style="display:flex;justify-content:space-between;align-items:center;gap:8px">'
            f'<div><b class="mono">{_e(case)}</b> <span class="tag">{_e(device)}</span>'
            f'<span class="tag">{_e(dtype)}</span></div>{_verdict_pill(latest.get("passed"))}</div>'
            f'<div class="dots" title="verdicts, oldest → newest">{dots}</div>{"".join(rows)}'
            f'<div class="muted" style="font-size:12px;margin-top:4px">{len(group)} run'
            f'{"s" if len(group) != 1 else ""}, latest {_e(S.fmt_time(latest.get("created")))}</div></div>')


def render_index(runs: list[dict]) -> str:
    """The history page: per-case trends, then every run newest first with its regressions and a link.

    ``runs`` are results dicts; a run's link is ``run["_run"]["href"]`` (set by ``store.load_runs``).
    """
    runs = [r for r in runs if isinstance(r, dict)]
    ordered = sorted(runs, key=_order_key, reverse=True)
    prev = previous_map(runs)
    n_fail = sum(1 for r in runs if r.get("passed") is False)
    groups: dict[tuple, list[dict]] = {}
    for r in ordered:
        groups.setdefault(S.run_key(r), []).append(r)

    head = (f'<header class="banner"><div class="wrap"><div class="btitle"><h1>gemma4-parity · run history</h1>'
            f'<div class="meta">{len(runs)} run{"s" if len(runs) != 1 else ""} · {len(groups)} '
            f'case/device/dtype combination{"s" if len(groups) != 1 else ""} · {len(runs) - n_fail} passed · '
            f'{n_fail} failed</div></div>'
            f'<div class="bstats">latest<div class="big">'
            f'{_e(S.fmt_time(ordered[0].get("created")) if ordered else "—")}</div></div></div></header>')
    if not runs:
        body = head + '<main class="wrap"><p class="empty">No runs recorded yet.</p></main>'
        return page("gemma4-parity · run history", body)

    trends = "".join(_trend_card(k, g) for k, g in sorted(groups.items(), key=lambda kv: kv[0]))
    trs = []
    for r in ordered:
        p = prev.get(id(r))
        flags = compare(r, p)
        reg_html, n_bad = _regression_cell(flags, p is not None)
        lg = S.logits(r)
        fd = (r.get("summary") or {}).get("first_divergence")
        meta = r.get("_run") or {}
        href = meta.get("href")
        run_id = meta.get("id", "")
        fail = r.get("passed") is False
        when = _e(S.fmt_time(r.get("created")).removesuffix(" UTC"))
        when_html = f'<a href="{_e(href)}">{when}</a>' if href else when
        trs.append(
            f'<tr class="{"bad" if fail else ""}">'
            f'<td class="n" data-v="{run_time(r).timestamp() if run_time(r) != _EPOCH else ""}" '
            f'title="{_e(run_id)}">{when_html}</td>'
            f'<td data-v="{0 if fail else 1}">{_verdict_pill(r.get("passed"))}</td>'
            f'<td class="mono nowrap">{_e(r.get("case", ""))}</td>'
            f'<td class="nowrap">{_e(r.get("device", ""))} · {_e(r.get("dtype", ""))}</td>'
            f'<td class="mono nowrap{" red" if fd else ""}">{_e(fd) if fd else "<span class=muted>—</span>"}</td>'
            f'{_num_td(lg.get("rel_l2"))}{_num_td(lg.get("kl_max"))}{_num_td(S.worst_module_rel_l2(r))}'
            f'<td class="regs" data-v="{n_bad}">{reg_html}</td></tr>')
    table = ('<div class="tablewrap"><table class="sortable runs" id="runs"><thead><tr>'
             '<th title="links to the run\'s report">time (UTC) · report</th><th>verdict</th><th>case</th>'
             '<th>device · dtype</th><th>first divergence</th><th>logits rel L2</th><th>logits KL max</th>'
             '<th title="largest rel L2 of any module row">worst rel L2</th>'
             '<th title="against the previous run of the same case, device and dtype">regressions</th>'
             '</tr></thead><tbody>'
             + "".join(trs) + '</tbody></table></div>')
    body = (head + '<main class="wrap">'
            f'<section><h2>Trends<span class="sub">per case, device and dtype; oldest → newest; '
            f'red = failing run; log scale</span></h2><div class="trend">{trends}</div></section>'
            f'<section><h2>Runs<span class="sub">newest first; regressions are against the previous run of the '
            f'same case, device and dtype (rel_l2 grown ≥ {GROWTH:g}×, verdict flips)</span></h2>{table}</section>'
            '<footer>Generated by parity.report. Self-contained: no scripts or resources are loaded from '
            'elsewhere.</footer></main>')
    return page("gemma4-parity · run history", body)
