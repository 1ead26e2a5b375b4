"""Several systems under test side by side: one case, run by each system against one shared HF reference.

``python -m parity run --case C --system a,b --out DIR`` writes each system's run into ``DIR/<system>/``
(``results.json``, ``index.html``) and this page into ``DIR/index.html``: the shared reference, one card per
system (verdict, first divergence, logits, row counts, round trip, substituted parts, link to its report), the
rows of each system closest to (or furthest past) their gates, and the rows where the systems disagree: one
passes where another fails, or only some of them compare the row.

Every string from the results goes through ``html.escape``; numbers are formatted by ``summary.fmt``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from parity.engine.modes import MODES, rank
from parity.report import summary as S
from parity.report.html import _e, _kv, _name, _pill
from parity.report.page import page
from parity.report.store import REPORT, atomic_write

Run = tuple[str, dict, str]  # (system name, its results.json, relative link to its report)
MODE_LABELS = {m.name: m.label for m in MODES}
WORST = 5  # rows per system in the worst-rows table
CAP = 50  # rows in the disagreement table

_STYLE = """<style>
table.fixed th{white-space:normal;overflow-wrap:anywhere}
table.fixed td,table.fixed td.name{overflow-wrap:anywhere}
.syscards{grid-template-columns:repeat(auto-fit,minmax(260px,1fr))}
.small{font-size:11.5px}
</style>"""


def _mode(row: dict) -> str:
    return MODE_LABELS.get(str(row.get("mode")), str(row.get("mode") or "—"))


def _compared(row: dict) -> bool:
    """True for a gated row; a row reported as not compared has no gate, only its reason (``detail``)."""
    return isinstance(row.get("gate"), dict)


def _state(row: dict | None) -> str:
    """pass, fail, n/a (compared, no verdict) or none (no row, or a row not compared)."""
    if row is None or not _compared(row):
        return "none"
    return "pass" if row.get("passed") is True else "fail" if row.get("passed") is False else "n/a"


def _value(row: dict) -> str:
    """``metric value`` of a row's gate metric (rel_l2 when it has no gate)."""
    gate = row.get("gate") if isinstance(row.get("gate"), dict) else {}
    metric = str(gate.get("metric") or "rel_l2")
    v = row.get(metric)
    return f"{metric} {S.fmt_cos(v) if metric == 'cosine' else S.fmt(v)}"


def _use(row: dict) -> float | None:
    """Use of the gate (``summary.gate_usage``); a failing gated row without a value (never called) is ∞."""
    u = S.gate_usage(row)
    return math.inf if u is None and _compared(row) and row.get("passed") is False else u


def _order(row: dict, index: int) -> float:
    order = S.num(row.get("order"))
    return order if order is not None else index


def _why(row: dict) -> str:
    why = row.get("why") or row.get("missing") or row.get("detail")
    red = " red" if row.get("passed") is False else ""
    return f'<div class="why{red}" style="max-width:none">{_e(why)}</div>' if why else ""


def _same(runs: list[Run], get: Callable[[dict], Any]) -> str:
    """The value the systems share (those that give one), or each distinct value and a warning."""
    vals: list[str] = []
    for _, results, _ in runs:
        v = get(results)
        if v is not None and v != "" and str(v) not in vals:
            vals.append(str(v))
    warn = ' <span class="pill warn" title="the systems did not run against one reference">differs</span>'
    return " / ".join(_e(v) for v in vals or ["—"]) + (warn if len(vals) > 1 else "")


def _env(results: dict) -> dict:
    return results.get("env") if isinstance(results.get("env"), dict) else {}


def _device(results: dict) -> str | None:
    device, name = results.get("device"), _env(results).get("device_name")
    return f"{device} ({name})" if device and name and name != device else device


# ------------------------------------------------------------------------------------------ sections


def _verdict(runs: list[Run]) -> str:
    """FAIL when any system fails, PASS when every system passes, else N/A."""
    verdicts = [r.get("passed") for _, r, _ in runs]
    if any(v is False for v in verdicts):
        return "FAIL"
    return "PASS" if verdicts and all(v is True for v in verdicts) else "N/A"


def _banner(case: str, runs: list[Run]) -> str:
    word = _verdict(runs)
    cls = {"PASS": "pass", "FAIL": "fail"}.get(word, "")
    holds = sum(r.get("passed") is True for _, r, _ in runs)
    names = " · ".join(f"<b>{_e(n)}</b>" for n, _, _ in runs)
    return (f'<header class="banner {cls}"><div class="wrap">'
            f'<div class="verdict" id="verdict" data-verdict="{word}">{word}</div>'
            f'<div class="btitle"><h1 title="{_e(case)}">{_e(case)}</h1><div class="meta">{names}</div></div>'
            f'<div class="bstats">systems where parity holds<div class="big">{holds} / {len(runs)}</div></div>'
            '</div></header>')


def _reference(case: str, runs: list[Run]) -> str:
    pairs = [("case", _same([("", {"case": case}, "")] + runs, lambda r: r.get("case"))),
             ("device", _same(runs, _device)), ("dtype", _same(runs, lambda r: r.get("dtype"))),
             ("config hash", f'<code>{_same(runs, lambda r: r.get("config_hash"))}</code>'),
             ("seed", _same(runs, lambda r: r.get("seed"))),
             ("transformers", _same(runs, lambda r: _env(r).get("transformers")))]
    return ('<section id="reference"><h2>HF reference<span class="sub">shared by every system below</span></h2>'
            f'<div class="card">{_kv(pairs)}</div></section>')


def _card(i: int, name: str, results: dict, link: str) -> str:
    system = results.get("system") if isinstance(results.get("system"), dict) else {}
    passed = results.get("passed")
    cls, word = ("good", "parity HOLDS") if passed is True else ("bad", "parity FAILS") if passed is False else (
        "", "no verdict")
    fd = S.first_divergence(results)
    if fd is None:
        fd_html = "none"
    else:
        metric, value = fd.get("metric") or "", fd.get("value")
        fd_html = (f'<code>{_name(fd.get("name"))}</code><br>'
                   f'{_e(_mode(fd))} · {_e(metric)} '
                   f'<b class="red mono">{_e(S.fmt_cos(value) if metric == "cosine" else S.fmt(value))}</b> · '
                   f'gate {_e(fd.get("gate") or "—")}'
                   + (f'<div class="why red" style="max-width:none">{_e(fd["why"])}</div>' if fd.get("why") else ""))
    lg = S.logits(results)
    rows = S.modules(results)
    n_compared = sum(1 for r in rows if _compared(r))
    n_failing = sum(1 for r in rows if r.get("passed") is False)
    n_not = len(rows) - n_compared
    rt = results.get("roundtrip") if isinstance(results.get("roundtrip"), dict) else {}
    rt_bad = S.num(rt.get("tensors")) is not None and rt.get("bit_exact") != rt.get("tensors")
    rt_cls = ' class="red"' if rt_bad else ""
    subs = [s for s in system.get("substituted") or [] if isinstance(s, dict)]
    subs_html = _e(len(subs))
    if subs:
        items = "".join(f'<li>{_e(s.get("part", "?"))} → {_e(s.get("by", "?"))}'
                        f'{" (" + _e(s["reason"]) + ")" if s.get("reason") else ""}</li>' for s in subs)
        subs_html = (f'<details><summary>{len(subs)} part{"s" if len(subs) != 1 else ""}</summary>'
                     f'<ul class="small" style="margin:0;padding-left:16px">{items}</ul></details>')
    pairs = [("first divergence", fd_html), ("logits KL max", _e(S.fmt(lg.get("kl_max")))),
             ("top-1 agreement", _e(S.fmt_pct(lg.get("top1_agreement")))),
             ("rows compared", _e(S.fmt(n_compared)) + (f' <span class="muted">(+{n_not} not compared)</span>'
                                                        if n_not else "")),
             ("rows failing", f'<b class="{"red" if n_failing else "green"}">{_e(S.fmt(n_failing))}</b>'),
             ("round trip", f'<span{rt_cls}>{_e(S.fmt(rt.get("bit_exact")))} / '
                            f'{_e(S.fmt(rt.get("tensors")))} bit-exact</span>' if rt else "not run"),
             ("substituted", subs_html)]
    version = f'<span class="tag">{_e(system["version"])}</span>' if system.get("version") else ""
    return (f'<div class="card {cls}" id="sys-{i}" data-system="{_e(name)}"><h3 style="text-transform:none">'
            f'{_e(name)}{version}</h3><div class="headline {cls}">{word}</div>{_kv(pairs)}'
            f'<p style="margin:10px 0 0"><a href="{_e(link or name + "/" + REPORT)}">full report →</a></p></div>')


def _worst(runs: list[Run]) -> str:
    trs = []
    for name, results, _ in runs:
        ranked = [(u, i, r) for i, r in enumerate(S.modules(results)) if (u := _use(r)) is not None]
        ranked.sort(key=lambda t: (-t[0], _order(t[2], t[1]), rank(str(t[2].get("mode")))))
        top = [r for _, _, r in ranked[:WORST]]
        head = f'<td rowspan="{max(1, len(top))}"><b>{_e(name)}</b></td>'
        if not top:
            trs.append(f'<tr>{head}<td colspan="5" class="muted">no gated rows</td></tr>')
        for k, r in enumerate(top):
            bad = r.get("passed") is False
            trs.append(f'<tr class="{"bad" if bad else ""}">{head if k == 0 else ""}'
                       f'<td class="name">{_name(r.get("name", ""))}{_why(r) if bad else ""}</td>'
                       f'<td>{_e(_mode(r))}</td>'
                       f'<td class="mono">{_e(_value(r))}</td><td class="gate" style="white-space:normal">'
                       f'{_e(S.gate_text(r.get("gate")))}</td><td class="mono">{_e(S.fmt(S.gate_usage(r)))}×</td>'
                       f'<td>{_pill(r.get("passed"))}</td></tr>')
    return ('<section id="worst"><h2>Worst rows<span class="sub">per system, the rows using the most of their gate '
            '(value ÷ gate)</span></h2><div class="tablewrap"><table class="fixed"><colgroup>'
            '<col style="width:13%"><col style="width:34%"><col style="width:10%"><col style="width:16%">'
            '<col style="width:12%"><col style="width:9%"><col style="width:6%"></colgroup>'
            '<thead><tr><th>system</th><th>HF module</th><th>mode</th><th>value</th><th>gate</th><th>use</th>'
            f'<th></th></tr></thead><tbody>{"".join(trs)}</tbody></table></div></section>')


def disagreements(runs: list[Run]) -> list[dict]:
    """Rows (by HF name, mode, kind) that one system passes and another fails, or that only some systems
    compare: ``{name, mode, rows: [row or None per system], states, failing, order}``, failing first, each in HF
    order. Empty for a single system."""
    if len(runs) < 2:
        return []
    table: dict[tuple[str, str, str], dict] = {}
    for s, (_, results, _) in enumerate(runs):
        for i, r in enumerate(S.modules(results)):
            key = (str(r.get("name", "")), str(r.get("mode") or ""), str(r.get("kind") or ""))
            entry = table.setdefault(key, {"rows": [None] * len(runs), "order": math.inf})
            old = entry["rows"][s]
            if old is None or (_compared(r), r.get("passed") is False) > (_compared(old), old.get("passed") is False):
                entry["rows"][s] = r  # one HF module, several rows of one kind: keep the one that fails
            if _compared(r):  # rows not compared carry order 0
                entry["order"] = min(entry["order"], _order(r, i))
    out = []
    for (name, mode, _), entry in table.items():
        states = [_state(r) for r in entry["rows"]]
        if states.count("none") == len(states):
            continue
        if ("pass" in states and "fail" in states) or "none" in states:
            out.append({"name": name, "mode": mode, "rows": entry["rows"], "states": states,
                        "failing": "fail" in states, "order": entry["order"]})
    out.sort(key=lambda d: (not d["failing"], d["order"], rank(d["mode"] or ""), d["name"]))
    return out


def _cell(row: dict | None) -> str:
    if row is None:
        return '<td><span class="muted">not compared</span><div class="why">no row</div></td>'
    if not _compared(row):
        return f'<td><span class="muted">not compared</span>{_why(row)}</td>'
    probe = f'<div class="small muted">on {_e(row["probe"])}</div>' if row.get("probe") else ""
    return (f'<td>{_pill(row.get("passed"))} <span class="mono">{_e(_value(row))}</span>{probe}'
            f'<div class="small muted">gate {_e(S.gate_text(row.get("gate")))} · use '
            f'{_e(S.fmt(S.gate_usage(row)))}×</div>{_why(row) if row.get("passed") is False else ""}</td>')


def _disagree_section(runs: list[Run]) -> str:
    head = ('<section id="disagree"><h2>Where the systems disagree<span class="sub">one passes where another fails, '
            'or only some compare the row; failing rows first, in HF order</span></h2>')
    if len(runs) < 2:
        return head + '<p class="empty">Fewer than two systems: nothing to compare.</p></section>'
    found = disagreements(runs)
    if not found:
        return head + '<p class="empty">None: every row has the same verdict in every system.</p></section>'
    names = [n for n, _, _ in runs]
    trs = []
    for d in found[:CAP]:
        st = d["states"]
        fails = [n for n, s in zip(names, st) if s == "fail"]
        passes = [n for n, s in zip(names, st) if s == "pass"]
        absent = [n for n, s in zip(names, st) if s == "none"]
        what = []
        if fails and passes:
            what.append(f"fails in {', '.join(fails)}; passes in {', '.join(passes)}")
        if absent:
            what.append(f"not compared by {', '.join(absent)}")
        trs.append(f'<tr class="{"bad" if d["failing"] else ""}"><td class="name">{_name(d["name"])}</td>'
                   f'<td>{_e(MODE_LABELS.get(d["mode"], d["mode"] or "—"))}</td>'
                   + "".join(_cell(r) for r in d["rows"]) + f'<td>{_e("; ".join(what))}</td></tr>')
    more = len(found) - CAP
    more_html = (f'<p class="muted" id="disagree-more">{more} more row{"s" if more != 1 else ""} not shown '
                 '(see each system\'s report).</p>' if more > 0 else "")
    share = 52 / len(runs)
    cols = ('<col style="width:24%"><col style="width:9%">' + f'<col style="width:{share:.2f}%">' * len(runs)
            + '<col style="width:15%">')
    ths = "".join(f"<th>{_e(n)}</th>" for n in names)
    return (head + f'<p class="muted" style="margin:0 0 8px">{len(found)} row{"s" if len(found) != 1 else ""}'
            f'{" (first " + str(CAP) + " shown)" if more > 0 else ""}</p>'
            f'<div class="tablewrap"><table class="fixed" id="disagree-table"><colgroup>{cols}</colgroup>'
            f'<thead><tr><th>HF module</th><th>mode</th>{ths}<th>difference</th></tr></thead>'
            f'<tbody>{"".join(trs)}</tbody></table></div>{more_html}</section>')


# ------------------------------------------------------------------------------------------ page


def render_systems(case: str, runs: list[Run]) -> str:
    """One self-contained page comparing the runs of several systems on ``case`` (one HF reference)."""
    runs = [(str(n), r if isinstance(r, dict) else {}, str(link or "")) for n, r, link in runs]
    cards = "".join(_card(i, n, r, link) for i, (n, r, link) in enumerate(runs))
    body = (_STYLE + _banner(case, runs) + '<nav class="toc"><div class="wrap"><a href="#reference">Reference</a>'
            '<a href="#systems">Systems</a><a href="#worst">Worst rows</a><a href="#disagree">Disagreements</a>'
            f'</div></nav><main class="wrap">{_reference(case, runs)}'
            f'<section id="systems"><h2>Systems</h2><div class="grid syscards">{cards}</div></section>'
            f'{_worst(runs)}{_disagree_section(runs)}<footer>gemma4-parity · systems side by side · '
            'self-contained file, nothing is loaded from elsewhere · Hugging Face is the reference of every '
            'system.</footer></main>')
    return page(f"{_verdict(runs)} · {case} · {len(runs)} system{'s' if len(runs) != 1 else ''}", body)


def write_systems(out_dir: Path, case: str, runs: list[Run]) -> Path:
    """Write ``out_dir/index.html`` (atomically; it replaces no other file). Returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT
    atomic_write(path, render_systems(case, runs))
    return path
