"""One run's report: a single self-contained HTML file rendered from ``results.json`` (DESIGN.md section 8).

The first screen (1280×800) answers "does it hold, and if not where does it break, and since when": the
verdict banner, links to the history, the previous run, the last passing run and the start of a failing
streak, the first divergent module (a link to its row), the worst decoder layer, the logits metrics, for a
failing run what changed since the last pass (``history.changes``), a strip of counts (a failing run: how many
runs it has been failing), and the per-layer drift charts. Details follow: the layer × module heatmaps of gate
use, one per mode (isolated first),
regressions against the previous run, the module table (grouped by layer, sortable; a failing report opens
on its failing rows with the first divergence scrolled into view), routers, logits, the weight round-trip
and the provenance (third-party notices included).

Every string from the results goes through ``html.escape``; numbers are formatted by ``summary.fmt``.
"""
from __future__ import annotations

import math
from html import escape
from typing import Any

from parity.engine.modes import MODES, is_replay
from parity.report import summary as S
from parity.report.heatmap import section as heatmap_section
from parity.report.history import RULE, compare
from parity.report.page import page
from parity.report.svg import Point, Series, bar_chart, line_chart
from parity.report.training import GRADIENT_ROWS
from parity.report.training import section as training_section
from parity.report.lora import section as lora_section

MODE_COLORS = {m.name: m.color for m in MODES}
MODE_LABELS = {**{m.name: m.label for m in MODES}, **GRADIENT_ROWS}

_LOGIT_LABELS = [
    ("cosine", "cosine"), ("rel_l2", "rel L2"), ("max_abs", "max |Δ|"), ("top1_agreement", "top-1 agreement"),
    ("top1_decisive_agreement", "top-1 agreement (decisive)"), ("top5_overlap", "top-5 overlap"),
    ("kl_mean", "KL mean"), ("kl_p95", "KL p95"), ("kl_max", "KL max"),
    ("top1_flips_decisive", "decisive top-1 flips"), ("top1_flips_near_tie", "near-tie top-1 flips"),
    ("n_near_tie", "near-tie positions"), ("n_decisive", "decisive positions"), ("n_tokens", "tokens compared"),
]


_FLIP = '<span class="pill no">flip</span>'


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _name(x: Any) -> str:
    """An escaped dotted name that may wrap after its dots and before a bracket (``<wbr>``), never inside a word."""
    return _e(x).replace(".", ".<wbr>").replace("[", "<wbr>[")


def _dv(v: Any) -> str:
    x = S.num(v)
    return "" if x is None else repr(x)


def _pill(passed: Any, shared: bool = False) -> str:
    if shared:
        return '<span class="pill info">shared</span>'
    if passed is True:
        return '<span class="pill ok">pass</span>'
    if passed is False:
        return '<span class="pill no">FAIL</span>'
    return '<span class="pill warn">n/a</span>'


def _metric(label: str, value: str, bad: bool = False) -> str:
    return (f'<div class="metric"><div class="k">{_e(label)}</div>'
            f'<div class="v{" bad" if bad else ""}">{_e(value)}</div></div>')


def _kv(pairs: list[tuple[str, str]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def _is_shared(row: dict) -> bool:
    return bool(row.get("shared")) or row.get("status") == "shared"


def _gate_metric(row: dict) -> str | None:
    gate = row.get("gate")
    return str(gate.get("metric")) if isinstance(gate, dict) and gate.get("metric") else None


# ------------------------------------------------------------------------------------------ first screen


def _banner(results: dict, regressions: list[dict]) -> str:
    passed = results.get("passed")
    cls, word = ("pass", "PASS") if passed is True else ("fail", "FAIL") if passed is False else ("", "N/A")
    env = results.get("env") or {}
    device = results.get("device", "?")
    device_name = env.get("device_name")
    dev = f"{device} ({device_name})" if device_name and device_name != device else str(device)
    meta = [f"<b>{_e(dev)}</b>", f"<b>{_e(results.get('dtype', '?'))}</b>"]
    if results.get("seed") is not None:
        meta.append(f"seed {_e(results.get('seed'))}")
    meta.append(_e(S.fmt_time(results.get("created"))))
    n_ok, n = S.module_counts(results)
    commit = str(env.get("git_commit") or "")
    n_reg = sum(1 for f in regressions if f["severity"] == "regression")
    reg = f" · {n_reg} regression{'s' if n_reg != 1 else ''}" if n_reg else ""
    return (f'<header class="banner {cls}"><div class="wrap">'
            f'<div class="verdict" id="verdict" data-verdict="{word}">{word}</div>'
            f'<div class="btitle"><h1 title="{_e(results.get("case", ""))}">{_e(results.get("case", "(no case)"))}'
            f'</h1><div class="meta">{" · ".join(meta)}</div></div>'
            f'<div class="bstats">modules within gate<div class="big">{n_ok} / {n}</div>'
            f'{"commit " + _e(commit[:12]) if commit else ""}{" (dirty)" if env.get("git_dirty") is True else ""}'
            f'{_e(reg)}</div></div></header>')


def _checks_html(results: dict) -> str:
    """The run's named checks (``results["checks"]``: modules, logits, router, roundtrip, ...) as pills."""
    checks = results.get("checks")
    if not isinstance(checks, dict) or not checks:
        return ""
    pills = "".join(f'<span class="pill {"ok" if v is True else "no" if v is False else "warn"}" '
                    f'style="margin-right:4px">{_e(k)} {"✓" if v is True else "✗" if v is False else "?"}</span>'
                    for k, v in checks.items())
    return f'<div style="margin-top:10px">{pills}</div>{_modes_html(results)}'


def _modes_html(results: dict) -> str:
    """The comparison modes of the run (``results["modes"]``): those measured, and why any other did not run."""
    modes = results.get("modes")
    if not isinstance(modes, list) or not modes:
        return ""
    ran = ", ".join(_e(m.get("label") or m.get("name")) for m in modes if m.get("ran"))
    skipped = "; ".join(f'{_e(m.get("label") or m.get("name"))}: {_e(m.get("why"))}' for m in modes if not m.get("ran"))
    return (f'<div class="muted" style="font-size:12px;margin-top:6px" id="modes">modes: {ran}'
            f'{" · not run — " + skipped if skipped else ""}</div>')


def _fail_reasons(results: dict) -> list[str]:
    reasons = []
    checks = results.get("checks")
    if isinstance(checks, dict):
        reasons += [f"check failed: {k}" for k, v in checks.items() if v is False]
    bad = [r for r in S.modules(results) if r.get("passed") is False]
    if bad:
        reasons.append(f"{len(bad)} module row{'s' if len(bad) != 1 else ''} outside the gate")
    rt = results.get("roundtrip") or {}
    if isinstance(rt, dict) and S.num(rt.get("tensors")) is not None and S.num(rt.get("bit_exact")) is not None:
        if rt["bit_exact"] < rt["tensors"]:
            reasons.append(f"weight round-trip: {rt['tensors'] - rt['bit_exact']} tensor(s) not bit-exact")
    for f in (results.get("summary") or {}).get("failures") or []:
        reasons.append(str(f))
    return reasons


def _first_divergence_card(results: dict) -> str:
    fd = S.first_divergence(results)
    if fd is None:
        if results.get("passed") is False:
            reasons = _fail_reasons(results) or ["the run failed without a module divergence"]
            items = "".join(f"<li>{_e(r)}</li>" for r in reasons)
            return ('<div class="card bad" id="first-divergence"><h3>First divergence</h3>'
                    '<div class="headline">no module diverged</div>'
                    f'<ul style="margin:0;padding-left:18px">{items}</ul>{_checks_html(results)}</div>')
        pairs = []
        tight = S.tightest(results)
        if tight is not None:
            gm = _gate_metric(tight) or ""
            pairs = [("closest to its gate", f'<code>{_e(tight.get("name"))}</code>'),
                     ("", _e(f'{MODE_LABELS.get(str(tight.get("mode")), tight.get("mode"))} · {gm} '
                             f'{S.fmt(tight.get(gm))} vs {S.gate_text(tight.get("gate"))} '
                             f'({S.fmt_pct(S.gate_usage(tight))} of the gate)'))]
        return ('<div class="card good" id="first-divergence"><h3>First divergence</h3>'
                '<div class="headline good">none</div>'
                '<p class="muted" style="margin:0 0 8px">Every compared module is within its gate in both modes '
                '(isolated replay and end-to-end).</p>' + (_kv(pairs) if pairs else "") + _checks_html(results)
                + '</div>')
    metric = fd.get("metric") or ""
    value = fd.get("value")
    pairs = [("Megatron", f'<code>{_e(fd.get("megatron_name") or "—")}</code>'),
             ("mode", _e(MODE_LABELS.get(str(fd.get("mode")), fd.get("mode") or "—"))),
             (f"{metric or 'value'}",
              f'<b class="red mono">{_e(S.fmt_cos(value) if metric == "cosine" else S.fmt(value))}</b>'),
             ("gate", _e(fd.get("gate") or "—"))]
    if fd.get("probe"):
        pairs.append(("input", _e(fd["probe"])))
        family = ((results.get("probing") or {}).get("families") or {}).get(str(fd["probe"]).split(":")[0]) or {}
        found = (family.get("search") or {}).get("found") if isinstance(family.get("search"), dict) else None
        if found and found.get("probe") != fd["probe"]:
            pairs.append(("smallest failing", _e(f'{found.get("probe")} (seeded search, seed '
                                                 f'{family["search"].get("seed")})')))
    if isinstance(fd.get("example"), dict):
        ex = fd["example"]
        pairs.append(("reproduce", _e(", ".join(f"{k} {v}" for k, v in ex.items() if k not in ("family", "search"))
                                      + f" — {ex.get('search', '')}; the run's seed draws it again")))
    if fd.get("why"):
        pairs.append(("why", f'<b class="red">{_e(fd["why"])}</b>'))
    row = first_divergence_row(results)
    if row is not None:
        others = [m for m in ("cosine", "rel_l2", "max_abs") if m != metric and row.get(m) is not None]
        if others:
            pairs.append((" · ".join(o.replace("max_abs", "max |Δ|") for o in others),
                          _e(" · ".join(S.fmt_cos(row[o]) if o == "cosine" else S.fmt(row[o]) for o in others))))
        if row.get("ratio") is not None:
            pairs.append(("ratio to floor", _e(S.fmt(row.get("ratio")) + "×")))
        layer = S.layer_of(row)
        if layer is not None:
            pairs.append(("layer", _e(f"{layer} · {S.short_type(S.layer_type(results, layer)) or '?'} attention")))
    link = ' <a href="#fd-row" style="font-size:12px;font-weight:400">row ↓</a>' if row is not None else ""
    return ('<div class="card bad" id="first-divergence"><h3>First divergence</h3>'
            f'<div class="headline bad"><a class="red" href="#fd-row" title="go to its row in the module table">'
            f'{_e(fd.get("name"))}</a>{link}</div>'
            f'{_kv(pairs)}{_checks_html(results)}</div>')


def _worst_layer_card(results: dict) -> str:
    worst = S.worst_layer(results)
    if worst is None:
        return ('<div class="card" id="worst-layer"><h3>Worst layer</h3>'
                '<p class="empty">No decoder-layer rows in this run.</p></div>')
    if S.num(worst.get("rel_l2")) == 0.0:
        n = sum(1 for r in S.modules(results) if S.is_decoder_output(r))
        return ('<div class="card good" id="worst-layer"><h3>Worst layer (max rel L2)</h3>'
                '<div class="headline good">none: all layers identical</div>'
                f'<p class="muted" style="margin:0">All {n} decoder-layer outputs (both modes) have rel L2 = 0: '
                'Megatron reproduces Hugging Face bit for bit.</p></div>')
    layer = S.layer_of(worst)
    ltype = S.layer_type(results, layer)
    rows = [r for r in S.modules(results) if r.get("name") == worst.get("name")]
    rows.sort(key=lambda r: S.MODES.index(r["mode"]) if r.get("mode") in S.MODES else 9)
    trs = "".join(
        f'<tr class="{"bad" if r.get("passed") is False else ""}">'
        f'<td>{_e(MODE_LABELS.get(str(r.get("mode")), r.get("mode")))}</td>'
        f'<td class="n{" hit" if r is worst else ""}">{_e(S.fmt(r.get("rel_l2")))}</td>'
        f'<td class="n">{_e(S.fmt_cos(r.get("cosine")))}</td><td>{_pill(r.get("passed"))}</td></tr>'
        for r in rows)
    bad = any(r.get("passed") is False for r in rows)
    gate_texts = {S.gate_text(r.get("gate")) for r in rows if r.get("gate")}
    if len(gate_texts) == 1 and len(rows) > 1:
        gate_txt = f"{gate_texts.pop()} (both modes)"
    else:
        gate_txt = " · ".join(f'{MODE_LABELS.get(str(r.get("mode")), r.get("mode"))} {S.gate_text(r.get("gate"))}'
                              for r in rows if r.get("gate"))
    gates = f'<div class="muted" style="font-size:12px;margin-top:6px">gate: {_e(gate_txt)}</div>' if gate_txt else ""
    n_layers = len(S.layer_types(results)) or None
    depth = f" of {n_layers}" if n_layers else ""
    return (f'<div class="card{" bad" if bad else ""}" id="worst-layer"><h3>Worst layer (max rel L2)</h3>'
            f'<div class="headline{" bad" if bad else ""}">{_e(worst.get("name"))}'
            f'<span class="tag{" full" if ltype == "full_attention" else ""}">'
            f'{_e(S.short_type(ltype) or "?")}</span></div>'
            f'<div class="muted" style="font-size:12.5px;margin-bottom:6px">layer {_e(layer)}{_e(depth)} · '
            f'Megatron <code>{_e(worst.get("megatron_name") or "—")}</code></div>'
            f'<table><thead><tr><th>mode</th><th>rel L2</th><th>cosine</th><th></th></tr></thead>'
            f'<tbody>{trs}</tbody></table>{gates}</div>')


def _logits_card(results: dict) -> str:
    lg = S.logits(results)
    if not lg:
        return ('<div class="card" id="logits-card"><h3>Logits</h3>'
                '<p class="empty">No logits metrics in this run.</p></div>')
    logit_rows = [r for r in S.modules(results) if r.get("name") == "logits"]
    bad = any(r.get("passed") is False for r in logit_rows)
    flips = S.num(lg.get("top1_flips_decisive"))
    items = [("cosine", S.fmt_cos(lg.get("cosine")), False), ("rel L2", S.fmt(lg.get("rel_l2")), bad),
             ("max |Δ|", S.fmt(lg.get("max_abs")), False),
             ("top-1 agreement", S.fmt_pct(lg.get("top1_agreement")), False),
             ("KL mean", S.fmt(lg.get("kl_mean")), False), ("KL max", S.fmt(lg.get("kl_max")), False),
             ("KL p95", S.fmt(lg.get("kl_p95")), False),
             ("decisive top-1 flips",
              f"{S.fmt(lg.get('top1_flips_decisive'))} · {S.fmt(lg.get('n_near_tie'))} near-tie", bool(flips))]
    return (f'<div class="card{" bad" if bad else ""}" id="logits-card"><h3>Logits (after softcap)</h3>'
            '<div class="metrics">'
            + "".join(_metric(k, v, b) for k, v, b in items) + "</div></div>")


def _changed_card(results: dict, links: dict | None) -> str:
    """A failing run with a history: what changed since the last pass (commit range, packages, environment, run
    settings; ``history.changes``), the last pass linked, or that the case never passed here."""
    if results.get("passed") is not False or not links or links.get("failing_since") is None:
        return ""
    last = links.get("last_pass")
    changed = links.get("changed") or []
    if last is None:
        head = "no passing run of this case, system, device and dtype in the history"
        body = '<p class="muted" style="margin:0">Nothing to compare with: it failed from its first run on.</p>'
    else:
        head = (f'last pass <a href="{_e(last.get("href"))}" id="changed-last-pass">'
                f'{_e(S.fmt_time(last.get("created")).removesuffix(" UTC"))}</a>')
        items = "".join(
            f'<li data-kind="{_e(c["kind"])}"><b>{_e(c["what"])}</b> '
            + (f'<span class="mono">{_e(c["before"] or "—")}</span> → ' if c.get("before") is not None or
               c["kind"] != "run" else "")
            + f'<span class="mono">{_e(c["now"] or "—")}</span></li>' for c in changed)
        body = (f'<ul class="changes">{items}</ul>' if changed else
                '<p class="muted" style="margin:0">Nothing recorded changed: the same commit, packages, environment, '
                'seed, config and gates as the last pass.</p>')
    return (f'<div class="card bad changed" id="changed"><h3>Changed since the last pass'
            f'<span class="sub">{head}</span></h3>{body}</div>')


def _strip(results: dict, regressions: list[dict], has_previous: bool, links: dict | None = None) -> str:
    n_ok, n = S.module_counts(results)
    n_bad = sum(1 for r in S.modules(results) if r.get("passed") is False)
    tiles = [("modules within gate", f"{n_ok}<small> / {n}</small>",
              "good" if n and n_ok == n else "bad" if n_bad else ""),
             ("failing rows", f"{n_bad}", "bad" if n_bad else "good")]
    routers = [r for r in results.get("routers") or [] if isinstance(r, dict)]
    agree = [S.num(r.get("exact_set_agreement")) for r in routers]
    agree = [a for a in agree if a is not None]
    if agree:
        low = min(agree)
        decisive = sum(int(S.num(r.get("decisive_flips")) or 0) for r in routers)
        tiles.append(("router exact-set (min)", f"{_e(S.fmt_pct(low))}<small> · {decisive} decisive</small>",
                      "good" if low >= 1 else "warn" if not decisive else "bad"))
    else:
        tiles.append(("routers", '<small>none (dense)</small>', ""))
    rt = results.get("roundtrip") or {}
    if isinstance(rt, dict) and rt.get("tensors") is not None:
        ok = rt.get("bit_exact")
        tiles.append(("weights bit-exact", f"{_e(S.fmt(ok))}<small> / {_e(S.fmt(rt.get('tensors')))}</small>",
                      "good" if ok == rt.get("tensors") else "bad"))
    else:
        tiles.append(("weights bit-exact", "<small>not run</small>", ""))
    n_reg = sum(1 for f in regressions if f["severity"] == "regression")
    since = (links or {}).get("failing_since") if results.get("passed") is False else None
    if since is not None:  # a failing streak: how long it has lasted, not "0 regressions" against a failing run
        n = (links or {}).get("streak") or 1
        when = "this run" if since.get("self") else S.fmt_time(since.get("created")).removesuffix(" UTC")[:16]
        runs = f'{n} run{"s" if n != 1 else ""}'
        link = runs if since.get("self") else f'<a href="{_e(since.get("href"))}" style="color:inherit">{runs}</a>'
        tiles.append(("failing since", f'<span id="streak" data-runs="{n}">{link}</span>'
                                       f'<small> · {_e(when)}</small>', "bad"))
    elif has_previous:
        tiles.append(("regressions vs previous", f'<a href="#regressions" style="color:inherit">{n_reg}</a>',
                      "bad" if n_reg else "good"))
    else:
        tiles.append(("regressions vs previous", "<small>no previous run</small>", ""))
    return '<div class="strip">' + "".join(
        f'<div class="tile {c}"><div class="k">{_e(k)}</div><div class="v">{v}</div></div>'
        for k, v, c in tiles) + "</div>"


# ------------------------------------------------------------------------------------------ layer drift


def _drift_series(results: dict, rows: list[dict], metric: str, typed: bool) -> list[Series]:
    """One series per mode; ``metric="one_minus_cos"`` plots 1 − cosine (for a log axis)."""
    out = []
    for mode in S.MODES:
        pts = []
        for r in rows:
            if r.get("mode") != mode:
                continue
            layer = S.layer_of(r)
            if layer is None:
                continue
            ltype = S.layer_type(results, layer) if typed else None
            gate = S.gate_text(r.get("gate"))
            tip = (f"{r.get('name')} · {S.short_type(ltype) + ' · ' if ltype else ''}{MODE_LABELS[mode]}\n"
                   f"rel L2 {S.fmt(r.get('rel_l2'))} · cosine {S.fmt_cos(r.get('cosine'))} · "
                   f"max |Δ| {S.fmt(r.get('max_abs'))}{chr(10) + 'gate ' + gate if gate else ''}"
                   f"{chr(10) + 'FAIL' if r.get('passed') is False else ''}")
            if metric == "one_minus_cos":
                c = S.num(r.get("cosine"))
                y = None if c is None else (1.0 - c if math.isfinite(c) else c)
                if S.num(r.get("rel_l2")) == 0.0:  # identical tensors: cosine is 1, whatever fp64 rounding says
                    y = 0.0
            else:
                y = S.num(r.get(metric))
            pts.append(Point(x=layer, y=y, tip=tip, failed=r.get("passed") is False,
                             full=ltype == "full_attention"))
        if pts:
            out.append(Series(MODE_LABELS[mode], MODE_COLORS[mode], pts, dash="5 3" if is_replay(mode) else ""))
    return out


def _drift_charts(results: dict, rows: list[dict], what: str, typed: bool) -> str:
    full = {i for i, t in enumerate(S.layer_types(results)) if t == "full_attention"} if typed else set()
    cos = line_chart(_drift_series(results, rows, "one_minus_cos", typed),
                     title=f"{what}: cosine (log axis of 1 − cos)", y_label="cosine", log_y=True,
                     full_layers=full, log_label=S.cos_tick, zero_note="cosine is exactly 1 everywhere")
    rel = line_chart(_drift_series(results, rows, "rel_l2", typed), title=f"{what}: rel L2 (log axis)",
                     y_label="rel L2", log_y=True, full_layers=full)
    legend = ('<div class="legend"><span class="ci"></span> sliding-attention layer &nbsp; <span class="sq"></span> '
              'full-attention layer &nbsp; <span class="band"></span> full-attention band &nbsp; '
              '<span class="ring"></span> fails its gate &nbsp; hollow at the bottom = exact &nbsp; '
              'dashed = isolated replay, solid = end-to-end · hover for values</div>') if typed else (
        '<div class="legend"><span class="ring"></span> fails its gate &nbsp; dashed = isolated replay, '
        'solid = end-to-end</div>')
    return (f'<div class="grid g2"><div class="card">{cos}</div><div class="card">{rel}</div></div>{legend}')


def _layers_section(results: dict) -> str:
    text_rows = [r for r in S.modules(results) if S.is_decoder_output(r)]
    parts = []
    if text_rows:
        parts.append(_drift_charts(results, text_rows, "layer output", typed=True))
    vision_rows = [r for r in S.modules(results) if S.group_of(r) == "vision" and S.is_layer_output(r)]
    if vision_rows:
        parts.append('<h3 style="margin-top:14px">Vision encoder</h3>'
                     + _drift_charts(results, vision_rows, "vision layer output", typed=False))
    if not parts:
        return ""
    return ('<section id="layers"><h2>Drift by layer<span class="sub">whole-layer outputs; isolated replay feeds '
            'each layer the reference input, end-to-end lets error accumulate</span></h2>' + "".join(parts)
            + "</section>")


# ------------------------------------------------------------------------------------------ details


def _regressions_section(results: dict, previous: dict | None, flags: list[dict]) -> str:
    title = '<h2>Regressions vs previous run'
    if previous is None:
        return (f'<section id="regressions">{title}</h2><p class="empty">No earlier run of this case, system, '
                'device and dtype.</p></section>')
    prev_desc = (f'previous: {S.fmt_time(previous.get("created"))}, '
                 f'{"PASS" if previous.get("passed") is True else "FAIL" if previous.get("passed") is False else "?"}')
    pid = (previous.get("_run") or {}).get("id")
    sub = _e(prev_desc) + (f', run <a href="../{_e(pid)}/index.html">{_e(pid)}</a>' if pid else "")
    rule = f'<p class="muted" style="margin:0 0 8px;font-size:12.5px">{_e(RULE)}</p>'
    if not flags:
        return (f'<section id="regressions">{title}<span class="sub">{sub}</span></h2>{rule}'
                '<p class="empty">None: no verdict flip, no row that crossed its gate or grew.</p></section>')
    trs = []
    pills = {"regression": '<span class="pill no">regression</span>', "drift": '<span class="pill warn">drift</span>',
             "improvement": '<span class="pill ok">improvement</span>'}
    for f in flags:
        sev = f["severity"]
        cls = "bad" if sev == "regression" else ""
        if f["kind"] == "verdict":
            trs.append(f'<tr class="{cls}"><td>{pills[sev]}</td><td>verdict</td>'
                       f'<td colspan="7">{_e(f["message"])}</td></tr>')
            continue
        factor = f.get("factor")
        growth = (S.fmt(factor) + "×" if factor is not None else "from 0" if S.num(f.get("current")) else "—")
        kind = f' <span class="tag">{_e(f["row_kind"])}</span>' if f.get("row_kind") in ("mask", "rope") else ""
        trs.append(f'<tr class="{cls}"><td>{pills[sev]}</td><td>{_e(f["kind"])}</td>'
                   f'<td class="name">{_name(f.get("name"))}{kind}</td>'
                   f'<td class="name muted">{_name(f.get("megatron_name") or "—")}</td>'
                   f'<td>{_e(MODE_LABELS.get(str(f.get("mode")), f.get("mode")))}</td>'
                   f'<td class="n">{_e(f.get("metric", ""))} {_e(S.fmt(f.get("previous")))}</td>'
                   f'<td class="n">{_e(S.fmt(f.get("current")))}</td>'
                   f'<td class="n">{_e(growth)}{" · now failing" if f.get("now_failing") else ""}</td>'
                   f'<td class="n">{_e(_of_gate(f.get("gate_fraction")))}'
                   f'</td></tr>')
    n_reg = sum(1 for f in flags if f["severity"] == "regression")
    n_drift = sum(1 for f in flags if f["severity"] == "drift")
    counts = f"{n_reg} regression{'s' if n_reg != 1 else ''}, {n_drift} drift"
    return (f'<section id="regressions">{title}<span class="sub">{_e(counts)} · {sub}</span></h2>{rule}'
            '<div class="tablewrap" style="max-height:340px"><table><thead><tr><th></th><th>kind</th>'
            '<th>module (HF)</th><th>Megatron</th><th>mode</th>'
            '<th>before</th><th>now</th><th>growth</th><th>of the gate</th></tr></thead><tbody>' + "".join(trs)
            + "</tbody></table></div></section>")


def _of_gate(fraction: Any) -> str:
    v = S.num(fraction)
    if v is None:
        return "—"
    return S.fmt_pct(v) if v < 1 else f"{S.fmt(v)}× the gate"


def first_divergence_row(results: dict) -> dict | None:
    """The module row the first divergence names (HF name, mode and, when given, Megatron name), failing first."""
    fd = S.first_divergence(results)
    if not fd or not fd.get("name"):
        return None
    rows = [r for r in S.modules(results) if r.get("name") == fd.get("name")
            and (fd.get("mode") is None or r.get("mode") == fd.get("mode"))
            and (not fd.get("megatron_name") or r.get("megatron_name") == fd.get("megatron_name"))
            and (not fd.get("probe") or r.get("probe") == fd.get("probe"))]
    return next((r for r in rows if r.get("passed") is False), rows[0] if rows else None)


# column widths of the module table: fixed, so that it fits 1280 px whatever its names and numbers (names wrap at
# dots, a row's reason sits under its Megatron name, numbers keep one line)
MODTABLE_WIDTHS = (20.5, 19, 7, 4, 8.5, 6.5, 6.5, 10, 6.5, 5.5, 6)  # % of the table, column by column
MODTABLE_COLS = "<colgroup>" + "".join(f'<col style="width:{w}%">' for w in MODTABLE_WIDTHS) + "</colgroup>"


def _modules_section(results: dict) -> str:
    rows = S.modules(results)
    if not rows:
        return '<section id="modules"><h2>Modules</h2><p class="empty">No module rows in this run.</p></section>'
    # forward order: the engine's ``order`` (post-hook order) when present, else the list order
    pos = {id(r): (r["order"] if isinstance(r.get("order"), (int, float)) and not isinstance(r.get("order"), bool)
                   else i, S.MODES.index(r["mode"]) if r.get("mode") in S.MODES else 9, i)
           for i, r in enumerate(rows)}
    rows = sorted(rows, key=lambda r: pos[id(r)])
    groups: dict[str, list[dict]] = {}
    first_layer_row: dict[str, tuple] = {}  # per group (text, vision): position of its first row inside a layer
    for r in rows:
        if S.layer_of(r) is not None:
            first_layer_row.setdefault(S.group_of(r), pos[id(r)])
    for r in rows:
        first = first_layer_row.get(S.group_of(r))
        after = first is not None and pos[id(r)] > first
        groups.setdefault(S.row_group_label(r, after_layers=after), []).append(r)

    def order(label: str) -> tuple:
        members = groups[label]
        layers = [S.layer_of(m) for m in members if S.layer_of(m) is not None]
        tower = {"vision": 0, "audio": 1}.get(S.group_of(members[0]), 2)  # vision tower, audio tower, text: run order
        if not layers:  # embeddings before the layers, the final norm and logits after
            return (tower, 0 if label.endswith("before the layers") else 2, 0)
        return (tower, 1, min(layers))

    fd_row = first_divergence_row(results)
    trs, i = [], 0
    for label in sorted(groups, key=order):
        members = groups[label]
        n_bad = sum(1 for m in members if m.get("passed") is False)
        layer = S.layer_of(members[0]) if S.group_of(members[0]) == "text" else None
        ltype = S.layer_type(results, layer) if label.endswith(f"layers.{layer}") else None
        tag = (f'<span class="tag{" full" if ltype == "full_attention" else ""}">'
               f'{_e(S.short_type(ltype))} attention</span>'
               if ltype else "")
        cnt = (f'<span class="cnt"><b class="red">{n_bad} failing</b> · {len(members)} rows</span>' if n_bad
               else f'<span class="cnt">{len(members)} rows, all pass</span>')
        trs.append(f'<tr class="grp{" hasbad" if n_bad else ""}" data-i="{i}"><td colspan="11">{_e(label)}{tag}{cnt}'
                   '</td></tr>')
        i += 1
        for r in members:
            gm = _gate_metric(r)
            fail = r.get("passed") is False

            def cell(key: str, cos: bool = False) -> str:
                v = r.get(key)
                hit = " hit" if gm == key else ""
                return f'<td class="n{hit}" data-v="{_e(_dv(v))}">{_e(S.fmt_cos(v) if cos else S.fmt(v))}</td>'

            ratio = r.get("ratio")
            ratio_s = S.fmt(ratio) + "×" if S.num(ratio) is not None else "—"
            search = f'{r.get("name", "")} {r.get("megatron_name") or ""} {r.get("probe") or ""}'
            layer_v = S.layer_of(r)
            kind = r.get("kind")
            kind_tag = f'<span class="tag">{_e(kind)}</span>' if kind in ("mask", "rope", "router") else ""
            reason = r.get("why") or (r.get("detail") if isinstance(r.get("detail"), str) else None)
            why = f'<div class="why{" red" if fail else ""}">{_e(reason)}</div>' if reason else ""
            fd_attr = ' id="fd-row"' if r is fd_row else ""
            probe = (f'<div class="why" title="{_e(r.get("example") or "")}">{_e(r["probe"])}'
                     f'{" · found by search" if r.get("example") else ""}</div>' if r.get("probe") else "")
            trs.append(
                f'<tr class="{"bad" if fail else ""}{" fd" if fd_attr else ""}" data-i="{i}" data-s="{_e(search)}"'
                f'{fd_attr}>'
                f'<td class="name">{_name(r.get("name", ""))}{kind_tag}</td>'
                f'<td class="name muted">{_name(r.get("megatron_name") or "—")}{why}</td>'
                f'<td class="nowrap">{_e(MODE_LABELS.get(str(r.get("mode")), r.get("mode") or ""))}{probe}</td>'
                f'<td class="n" data-v="{"" if layer_v is None else layer_v}">{_e(S.fmt(layer_v))}</td>'
                f'{cell("cosine", cos=True)}{cell("rel_l2")}{cell("max_abs")}'
                f'<td class="gate">{_e(S.gate_text(r.get("gate")) or "—")}</td>'
                f'<td class="n" data-v="{_e(_dv(r.get("floor")))}">{_e(S.fmt(r.get("floor")))}</td>'
                f'<td class="n" data-v="{_e(_dv(ratio))}">{_e(ratio_s)}</td>'
                f'<td data-v="{0 if fail else 1}">{_pill(r.get("passed"), _is_shared(r))}</td></tr>')
            i += 1
    n_bad = sum(1 for r in rows if r.get("passed") is False)
    failing = n_bad > 0  # a failing report opens on its failing rows
    controls = ('<div class="controls"><input type="search" placeholder="filter by module name (HF or Megatron)" '
                'data-filter="modtable" aria-label="filter modules">'
                f'<label><input type="checkbox" data-failonly="modtable"{" checked" if failing else ""}> '
                f'failing only ({n_bad})</label>'
                '<button type="button" data-regroup="modtable">group by layer</button>'
                '<span class="muted">click a header to sort (flattens the groups); the gated metric is bold</span>'
                '</div>')
    return ('<section id="modules"><h2>Modules<span class="sub">'
            f'{len(rows)} rows · both modes · HF path with the Megatron module beside it</span></h2>{controls}'
            '<div class="tablewrap" style="max-height:720px">'
            f'<table class="sortable fixed{" failonly" if failing else ""}" '
            f'id="modtable">{MODTABLE_COLS}<thead><tr>'
            '<th>module (HF)</th><th>Megatron</th><th>mode</th><th>layer</th><th>cosine</th><th>rel L2</th>'
            '<th>max |Δ|</th><th>gate</th><th title="noise floor: HF bf16 vs HF fp32, same module and mode">floor</th>'
            '<th title="rel L2 / floor">ratio</th><th>result</th></tr></thead><tbody>'
            + "".join(trs) + "</tbody></table></div></section>")


def _routers_section(results: dict) -> str:
    routers = sorted((r for r in results.get("routers") or [] if isinstance(r, dict)),
                     key=lambda r: (S.num(r.get("layer")) if S.num(r.get("layer")) is not None else 1e9))
    if not routers:
        return ""
    cats = [str(r.get("layer", "?")) for r in routers]

    def pts(key: str) -> list[Point]:
        out = []
        for r in routers:
            v = S.num(r.get(key))
            tip = (f"layer {r.get('layer')}: exact-set {S.fmt_pct(r.get('exact_set_agreement'))}, "
                   f"Jaccard {S.fmt(r.get('jaccard_mean'))}, decisive flips {S.fmt(r.get('decisive_flips'))}")
            out.append(Point(x=0, y=v, tip=tip))
        return out

    decisive = {j for j, r in enumerate(routers) if (S.num(r.get("decisive_flips")) or 0) > 0}
    chart = bar_chart(cats, [Series("exact-set agreement", "#0969da", pts("exact_set_agreement")),
                             Series("Jaccard mean", "#8cb4ff", pts("jaccard_mean"))],
                      title="router agreement per layer", y_label="agreement", highlight=decisive)
    has_iso = any("isolated_decisive_flips" in r for r in routers)
    trs = []
    for r in routers:
        layer = S.num(r.get("layer"))
        ltype = S.layer_type(results, int(layer)) if layer is not None and math.isfinite(layer) else None
        dec = S.num(r.get("decisive_flips")) or 0
        trs.append(f'<tr class="{"bad" if dec > 0 else ""}"><td class="n">{_e(S.fmt(r.get("layer")))}</td>'
                   f'<td>{_e(S.short_type(ltype) or "—")}</td>'
                   f'<td class="n" data-v="{_e(_dv(r.get("exact_set_agreement")))}">'
                   f'{_e(S.fmt_pct(r.get("exact_set_agreement")))}</td>'
                   f'<td class="n" data-v="{_e(_dv(r.get("jaccard_mean")))}">{_e(S.fmt(r.get("jaccard_mean"), 5))}</td>'
                   f'<td class="n" data-v="{_e(_dv(r.get("weight_mass_moved")))}">'
                   f'{_e(S.fmt(r.get("weight_mass_moved")))}</td>'
                   f'<td class="n">{_e(S.fmt(r.get("near_tie_flips")))}</td>'
                   f'<td class="n{" hit" if dec else ""}">{_e(S.fmt(r.get("decisive_flips")))}</td>'
                   + (f'<td class="n{" hit" if (S.num(r.get("isolated_decisive_flips")) or 0) > 0 else ""}">'
                      f'{_e(S.fmt(r.get("isolated_decisive_flips")))}</td>' if has_iso else "") + '</tr>')
    table = ('<div class="tablewrap" style="max-height:300px"><table class="sortable"><thead><tr><th>layer</th>'
             '<th>type</th><th title="share of tokens whose top-k expert set is identical">exact set</th>'
             '<th title="mean Jaccard index of the expert sets">Jaccard</th>'
             '<th title="routed weight mass moved to other experts (mean over tokens)">mass moved</th>'
             '<th title="set mismatches between near-tied experts">near-tie</th>'
             '<th title="set mismatches that are not near ties">decisive</th>'
             + ('<th title="decisive flips with HF inputs replayed (gated)">iso. decisive</th>' if has_iso else "")
             + '</tr></thead><tbody>'
             + "".join(trs) + "</tbody></table></div>")
    return ('<section id="routers"><h2>MoE routing<span class="sub">expert-set agreement per layer; flips between '
            'experts whose scores nearly tie are noise, decisive flips are not</span></h2>'
            '<div class="grid g2" style="grid-template-columns:1fr 1.15fr">'
            f'<div class="card">{chart}</div>{table}</div>'
            '</section>')


def _logits_section(results: dict) -> str:
    lg = S.logits(results)
    if not lg:
        return ""
    known = {k for k, _ in _LOGIT_LABELS} | {"worst_positions"}
    pairs = [(label, _e(S.fmt_cos(lg[k]) if k == "cosine" else S.fmt_pct(lg[k]) if k in
              ("top1_agreement", "top1_decisive_agreement", "top5_overlap") else S.fmt(lg[k])))
             for k, label in _LOGIT_LABELS if k in lg]
    pairs += [(k, _e(S.fmt(v))) for k, v in lg.items() if k not in known and not isinstance(v, (list, dict))]
    worst = [w for w in lg.get("worst_positions") or [] if isinstance(w, dict)]
    if worst:
        trs = "".join(
            f'<tr class="{"bad" if w.get("ref_top1") != w.get("test_top1") else ""}">'
            f'<td class="n">{_e(S.fmt(w.get("batch")))}</td><td class="n">{_e(S.fmt(w.get("pos")))}</td>'
            f'<td class="n" data-v="{_e(_dv(w.get("kl")))}">{_e(S.fmt(w.get("kl")))}</td>'
            f'<td class="n">{_e(w.get("ref_top1", "—"))}</td><td class="n">{_e(w.get("test_top1", "—"))}</td>'
            f'<td class="n" data-v="{_e(_dv(w.get("gap")))}">{_e(S.fmt(w.get("gap")))}</td>'
            f'<td>{_FLIP if w.get("ref_top1") != w.get("test_top1") else ""}</td></tr>'
            for w in worst)
        table = ('<div class="tablewrap"><table class="sortable"><thead><tr><th>batch</th><th>position</th>'
                 '<th>KL</th><th>HF top-1</th><th>Megatron top-1</th><th>HF top-1 − top-2 gap</th><th></th></tr>'
                 '</thead>'
                 f'<tbody>{trs}</tbody></table></div>')
    else:
        table = '<p class="empty">No per-position detail.</p>'
    return ('<section id="logits"><h2>Logits<span class="sub">KL per token is summed over the vocabulary, then '
            'mean / p95 / max over tokens</span></h2><div class="grid g2" style="grid-template-columns:1fr 1.6fr">'
            f'<div class="card">{_kv(pairs)}</div><div><h3>Worst positions (by KL)</h3>{table}</div></div></section>')


def _probing_section(results: dict) -> str:
    """The probing mode's families: their fixed points, rows (failing), the seeded search and what it found, and
    the mode's cost."""
    pr = results.get("probing")
    if not isinstance(pr, dict) or not isinstance(pr.get("families"), dict):
        return ""
    trs = []
    for name, f in pr["families"].items():
        if not isinstance(f, dict):
            continue
        search = f.get("search") if isinstance(f.get("search"), dict) else None
        if f.get("skipped"):
            found = f'<span class="muted">not run: {_e(f["skipped"])}</span>'
        elif search is None:
            found = '<span class="muted">fixed points only</span>'
        elif search.get("skipped"):
            found = f'<span class="muted">{_e(search["skipped"])}</span>'
        elif search.get("found"):
            ex = search["found"]
            found = (f'<b class="red">{_e(ex.get("probe"))}</b> <span class="muted">(smallest failing input, '
                     f'{_e(search.get("checks"))} checks, seed {_e(search.get("seed"))})</span>')
        else:
            found = (f'<span class="green">law held</span> <span class="muted">({_e(search.get("checks"))} examples, '
                     f'seed {_e(search.get("seed"))})</span>')
        bad = bool(f.get("failing"))
        trs.append(f'<tr class="{"bad" if bad else ""}"><td class="nowrap"><b>{_e(name)}</b></td>'
                   f'<td>{_e("; ".join(map(str, f.get("points") or [])))}</td>'
                   f'<td class="n">{_e(S.fmt(f.get("rows")))}</td><td class="n hit">{_e(S.fmt(f.get("failing")))}</td>'
                   f'<td>{found}</td><td class="n">{_e(S.fmt_seconds(f.get("seconds")))}</td></tr>')
    cost = ""
    if S.num(pr.get("seconds")) is not None:
        cost = (f' · {_e(S.fmt_seconds(pr["seconds"]))}'
                + (f', {_e(S.fmt_pct(pr.get("share_of_run")))} of the run' if S.num(pr.get("share_of_run")) is not None
                   else ""))
    return ('<section id="probing"><h2>Probing<span class="sub">modules replayed on moved inputs, both sides fed '
            f'the same; searches seeded{cost}</span></h2><div class="tablewrap"><table><thead><tr><th>family</th>'
            '<th>fixed points</th><th>rows</th><th>failing</th><th>search (hypothesis)</th><th>time</th></tr></thead>'
            '<tbody>' + "".join(trs) + '</tbody></table></div></section>')


def _roundtrip_section(results: dict) -> str:
    rt = results.get("roundtrip")
    if not isinstance(rt, dict) or not rt:
        return ('<section id="roundtrip"><h2>Weight round-trip</h2><p class="empty">Not part of this run.</p>'
                '</section>')
    n, ok = rt.get("tensors"), rt.get("bit_exact")
    head = (f'{_e(S.fmt(ok))} of {_e(S.fmt(n))} tensors bit-exact after HF → Megatron → HF; '
            f'max |Δ| {_e(S.fmt(rt.get("max_abs_diff")))}')
    extra = [(k, _e(S.fmt(v) if not isinstance(v, (list, dict)) else ", ".join(map(str, v)) if isinstance(v, list)
             else str(v))) for k, v in rt.items() if k not in ("tensors", "bit_exact", "max_abs_diff", "rows")]
    rows = [r for r in rt.get("rows") or [] if isinstance(r, dict)]
    rows.sort(key=lambda r: (r.get("bit_exact") is True, -(S.finite(r.get("max_abs_diff")) or 0.0),
                             str(r.get("name", ""))))

    def tr(r: dict) -> str:
        shape = r.get("shape")
        shape_s = "×".join(map(str, shape)) if isinstance(shape, (list, tuple)) else str(shape or "—")
        bad = r.get("bit_exact") is not True
        return (f'<tr class="{"bad" if bad else ""}"><td class="name">{_e(r.get("name", ""))}</td>'
                f'<td class="mono">{_e(shape_s)}</td><td>{_e(r.get("dtype", "—"))}</td>'
                f'<td class="n" data-v="{_e(_dv(r.get("max_abs_diff")))}">{_e(S.fmt(r.get("max_abs_diff")))}</td>'
                f'<td data-v="{0 if bad else 1}">{_pill(not bad)}</td></tr>')

    thead = ('<thead><tr><th>tensor</th><th>shape</th><th>dtype</th><th>max |Δ|</th><th>bit-exact</th></tr></thead>')
    bad_rows = [r for r in rows if r.get("bit_exact") is not True]
    good_rows = [r for r in rows if r.get("bit_exact") is True]
    tables = ""
    if bad_rows or len(good_rows) <= 40:
        shown = bad_rows + (good_rows if len(good_rows) <= 40 else [])
        tables += (f'<div class="tablewrap" style="max-height:520px"><table class="sortable">{thead}<tbody>'
                   + "".join(tr(r) for r in shown) + "</tbody></table></div>")
    if len(good_rows) > 40:
        tables += (f'<details><summary>{len(good_rows)} bit-exact tensors</summary><div class="tablewrap" '
                   f'style="max-height:520px"><table class="sortable">{thead}<tbody>'
                   + "".join(tr(r) for r in good_rows)
                   + "</tbody></table></div></details>")
    if not rows:
        tables = '<p class="empty">No per-tensor rows.</p>'
    bad = S.num(n) is not None and S.num(ok) is not None and ok != n
    return (f'<section id="roundtrip"><h2>Weight round-trip<span class="sub">mismatches first</span></h2>'
            f'<p class="{"red" if bad else "green"}" style="margin:0 0 8px;font-weight:600">{head}</p>'
            + (_kv(extra) if extra else "") + tables + "</section>")


def _dirty(env: dict) -> str:
    """A marker after the commit: local edits (``git_dirty``) make a run unlike a clean one of that commit."""
    dirty = env.get("git_dirty")
    if dirty is True:
        return ' <span class="pill warn" title="the working tree had uncommitted changes">dirty</span>'
    if dirty is False:
        return ' <span class="muted">clean</span>'
    return ""


def _provenance_section(results: dict) -> str:
    env = results.get("env") or {}
    pairs = [("case", _e(results.get("case", "—"))), ("device", _e(results.get("device", "—"))),
             ("dtype", _e(results.get("dtype", "—"))), ("seed", _e(results.get("seed", "—"))),
             ("created", _e(S.fmt_time(results.get("created")))),
             ("config hash", f'<code>{_e(results.get("config_hash") or "—")}</code>')]
    notes: list[str] = []
    if isinstance(env, dict):
        for k, v in env.items():
            if k == "warnings":
                notes = [str(w) for w in v] if isinstance(v, list) else [str(v)]
                continue
            if k == "git_dirty":
                continue
            if k == "git_commit":
                val = f"<code>{_e(v)}</code>" + _dirty(env)
            elif isinstance(v, dict):
                val = _e(", ".join(f"{a} {b}" for a, b in v.items()))
            elif isinstance(v, list):
                val = _e(" ".join(map(str, v)))
            else:
                val = _e(v)
            pairs.append((k.replace("_", " "), val))
    listed = {"case", "device", "dtype", "seed", "created", "config_hash", "env", "passed", "summary", "modules",
              "routers", "roundtrip", "phases", "peak_memory", "layer_types", "_run", "regressions"}
    for k, v in results.items():
        if k not in listed and not isinstance(v, (dict, list)):
            pairs.append((k.replace("_", " "), _e(S.fmt(v) if isinstance(v, float) else v)))
    types = S.layer_types(results)
    if types:
        pattern = " ".join("F" if t == "full_attention" else "S" if t == "sliding_attention" else "?" for t in types)
        pairs.append(("layer pattern", f'<code>{_e(pattern)}</code> <span class="muted">(S sliding, F full)</span>'))
    if notes:
        items = "".join(f"<li><code>{_e(n)}</code></li>" for n in notes)
        pairs.append(("warnings", f'<details><summary>{len(notes)} third-party warning{"s" if len(notes) != 1 else ""}'
                                  f'</summary><ul style="margin:0;padding-left:18px">{items}</ul></details>'))
    blocks = [f'<div class="card"><h3>Environment</h3>{_kv(pairs)}</div>']
    handled = listed | {"checks"}
    settings = []
    for k, v in results.items():
        if k in handled or not isinstance(v, dict):
            continue
        for sub, val in _flatten(v, k):
            settings.append((sub, _e(S.fmt(val) if isinstance(val, float) else val)))
    checks = results.get("checks")
    if isinstance(checks, dict):
        settings = [(f"check {k}", _pill(v)) for k, v in checks.items()] + settings
    phases = results.get("phases")
    side = []
    if isinstance(phases, dict) and phases:
        total = sum(S.finite(v) or 0.0 for v in phases.values()) or 1.0
        rows = "".join(
            f'<tr><td>{_e(k)}</td><td class="n">{_e(S.fmt_seconds(v))}</td><td style="width:45%">'
            f'<span class="bar" style="width:{100 * (S.finite(v) or 0) / total:.1f}%"></span></td></tr>'
            for k, v in phases.items())
        side.append(f'<h3>Phases</h3><table><tbody>{rows}</tbody></table>')
    mem = results.get("peak_memory")
    if isinstance(mem, dict) and mem:
        def mv(k: str, v: Any) -> str:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if "gib" in k.lower() or "gb" in k.lower():
                    return S.fmt(v) + " GiB"
                if "mib" in k.lower() or "mb" in k.lower():
                    return S.fmt(v) + " MiB"
                return S.fmt_bytes(v)
            return str(v)
        side.append('<h3 style="margin-top:12px">Peak memory</h3>'
                    + _kv([(k, _e(mv(k, v))) for k, v in mem.items()]))
    if settings:
        side.append('<h3 style="margin-top:12px">Run settings</h3>' + _kv(settings[:80]))
    if side:
        blocks.append('<div class="card">' + "".join(side) + "</div>")
    return ('<section id="provenance"><h2>Environment and provenance</h2><div class="grid g2">' + "".join(blocks)
            + "</div></section>")


def _flatten(d: dict, prefix: str, depth: int = 0) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}"
        if isinstance(v, dict) and depth < 2:
            out += _flatten(v, key, depth + 1)
        elif isinstance(v, (list, tuple)):
            out.append((key, ", ".join(map(str, v[:12])) + (" …" if len(v) > 12 else "")))
        else:
            out.append((key, v))
    return out


# ------------------------------------------------------------------------------------------ page


def _since(links: dict | None) -> str:
    """The "since when" links of a run page: history, previous run, last passing run, failing since."""
    if not links:
        return ""

    def a(ref: dict | None, label: str, anchor: str) -> str:
        if not ref or not ref.get("href"):
            return ""
        verdict = "PASS" if ref.get("passed") is True else "FAIL" if ref.get("passed") is False else "?"
        tip = f'{S.fmt_time(ref.get("created"))} · {verdict} · run {ref.get("id") or "?"}'
        return f'<a href="{_e(ref["href"])}" id="{anchor}" title="{_e(tip)}">{_e(label)}</a>'

    prev = links.get("previous")
    prev_label = f'previous ({"PASS" if prev.get("passed") is True else "FAIL"})' if prev else ""
    parts = [f'<a href="{_e(links.get("history") or "../../index.html")}" id="link-history">history</a>',
             a(prev, prev_label, "link-previous")]
    since = links.get("failing_since")
    if since is not None:
        parts.append(a(links.get("last_pass"), "last pass", "link-last-pass")
                     or '<span id="link-last-pass">never passed</span>')
        n = links.get("streak") or 1
        if since.get("self"):
            parts.append('<span class="red" id="link-failing-since">failing since this run</span>')
        else:
            parts.append(a(since, f"failing since {S.fmt_time(since.get('created')).removesuffix(' UTC')} "
                                  f"({n} runs)", "link-failing-since"))
    return '<div class="since">' + "".join(p for p in parts if p) + "</div>"


def render_run(results: dict, previous: dict | None = None, links: dict | None = None) -> str:
    """One self-contained HTML report of ``results``; regressions are computed against ``previous``.

    ``links`` (``history.run_links``) adds the "since when" links: the history page, the previous run, the
    last passing run and the first failing run of the current streak.
    """
    results = results if isinstance(results, dict) else {}
    flags = compare(results, previous)
    sections = [
        ("summary", "Summary"), ("layers", "Layers"), ("heatmap", "Heatmap"), ("regressions", "Regressions"),
        ("modules", "Modules"), ("training", "Training"), ("probing", "Probing"), ("routers", "Routing"),
        ("logits", "Logits"),
        ("roundtrip", "Round-trip"),
        ("provenance", "Environment"),
    ]
    body_parts = [
        '<section id="summary"><div class="grid g3">', _first_divergence_card(results), _worst_layer_card(results),
        _logits_card(results), "</div>", _changed_card(results, links),
        _strip(results, flags, previous is not None, links), "</section>",
        _layers_section(results), heatmap_section(results), _regressions_section(results, previous, flags),
        _modules_section(results), training_section(results), lora_section(results), _probing_section(results), _routers_section(results),
        _logits_section(results),
        _roundtrip_section(results), _provenance_section(results),
    ]
    body_html = "".join(body_parts)
    toc = "".join(f'<a href="#{sid}">{label}</a>' for sid, label in sections if f'id="{sid}"' in body_html)
    verdict = "PASS" if results.get("passed") is True else "FAIL" if results.get("passed") is False else "N/A"
    body = (_banner(results, flags) + f'<nav class="toc"><div class="wrap">{toc}{_since(links)}</div></nav>'
            f'<main class="wrap">{body_html}<footer>gemma4-parity report · self-contained file, nothing is loaded '
            'from elsewhere · Hugging Face is the reference, Megatron-core the implementation under test.'
            '</footer></main>')
    return page(f"{verdict} · {results.get('case', 'parity run')}", body)
