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

GROWTH = 2.0  # a gated value growing by at least this factor is worth a look ...
MATERIAL = 0.1  # ... and a regression only once it uses at least this fraction of its gate (else: drift)
ABS_FLOOR = 1e-12  # values below this count as zero (no 0 -> 1e-15 noise flags)

RULE = (f"regression: the verdict flips to FAIL, a row crosses its gate, a finite value turns NaN/inf, or a row's "
        f"gated value grows ≥ {GROWTH:g}× to ≥ {MATERIAL:.0%} of its gate; drift: a ≥ {GROWTH:g}× growth that "
        f"stays below {MATERIAL:.0%} of the gate (or a row without a gate). Rows are matched by (HF name, "
        f"Megatron name, kind, mode).")

_EPOCH = datetime.min.replace(tzinfo=timezone.utc)
PACKAGES = ("python", "torch", "transformers", "megatron_core", "megatron_bridge", "numpy", "safetensors")
ENVIRONMENT = ("host", "device_name", "threads")


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _flag(kind: str, severity: str, message: str, **extra: Any) -> dict:
    return {"kind": kind, "severity": severity, "message": message, **extra}


def _grew(cur: float, prev: float) -> bool:
    return math.isfinite(prev) and cur >= GROWTH * max(prev, ABS_FLOOR)


def _factor(cur: float | None, prev: float | None) -> float | None:
    if cur is None or prev is None or not math.isfinite(cur) or prev <= 0 or not math.isfinite(prev):
        return None
    return cur / prev


def _gated(row: dict) -> tuple[str, float | None]:
    """(metric, gate max) of a row: its gate's metric and bound, else rel_l2 without a bound."""
    gate = row.get("gate")
    if isinstance(gate, dict) and gate.get("metric"):
        return str(gate["metric"]), S.num(gate.get("max"))
    return "rel_l2", None


def _label(row: dict) -> str:
    kind = row.get("kind")
    extra = f" {kind}" if kind in ("mask", "rope") else ""
    return f"{row.get('name')} [{row.get('mode')}{extra}]"


def _row_flag(row: dict, old: dict) -> dict | None:
    metric, limit = _gated(row)
    cur, prev = S.num(row.get(metric)), S.num(old.get(metric))
    if cur is None or prev is None:
        return None
    common = {"name": row.get("name"), "megatron_name": row.get("megatron_name"), "row_kind": row.get("kind"),
              "mode": row.get("mode"), "metric": metric, "previous": prev, "current": cur, "gate": limit,
              "factor": _factor(cur, prev), "order": S.num(row.get("order")),
              "gate_fraction": (cur / limit if limit and math.isfinite(cur) else None)}
    change = f"{metric} {S.fmt(prev)} → {S.fmt(cur)}"
    was_ok, is_ok = old.get("passed"), row.get("passed")
    if was_ok is True and is_ok is False:
        return _flag("gate", "regression", f"{_label(row)} now fails its gate ({change}, gate {S.fmt(limit)})",
                     now_failing=True, **common)
    if was_ok is False and is_ok is True:
        return _flag("gate", "improvement", f"{_label(row)} passes again ({change})", now_failing=False, **common)
    if math.isnan(cur) or math.isinf(cur):
        if math.isfinite(prev):
            return _flag("nonfinite", "regression", f"{_label(row)} {metric} turned {S.fmt(cur)}",
                         now_failing=is_ok is False, **common)
        return None
    if not _grew(cur, prev):
        return None
    how = f"{S.fmt(common['factor'])}×" if common["factor"] is not None else "from 0"
    material = limit is not None and cur >= MATERIAL * limit
    if material:
        return _flag("growth", "regression", f"{_label(row)} {change} ({how}, {S.fmt_pct(cur / limit)} of the "
                     f"gate {S.fmt(limit)})" if limit else f"{_label(row)} {change} ({how})",
                     now_failing=is_ok is False, **common)
    where = f", {S.fmt_pct(cur / limit)} of the gate" if limit else ", no gate"
    return _flag("growth", "drift", f"{_label(row)} {change} ({how}{where})", now_failing=False, **common)


def compare(current: dict, previous: dict | None) -> list[dict]:
    """Regression, drift and improvement flags of ``current`` against ``previous`` (None: no flags).

    Rows are matched by ``summary.row_key`` (HF name, Megatron name, kind, mode) and judged on their gated
    metric (``gate.metric``, else rel_l2); the rule is ``RULE``. Each flag is ``{kind, severity, message,
    ...}`` with ``severity`` one of ``regression``, ``drift``, ``improvement``:
    - ``kind="verdict"``: the verdict flipped (PASS → FAIL is a regression, FAIL → PASS an improvement).
    - ``kind="gate"``: a row that passed its gate fails it now (regression), or the reverse (improvement).
    - ``kind="nonfinite"``: a finite value turned NaN/inf (regression).
    - ``kind="growth"``: the gated value grew ≥ ``GROWTH``× (values below ``ABS_FLOOR`` count as that
      floor; ``factor`` is None from 0): a regression at ≥ ``MATERIAL`` of the gate, else drift.
    Row flags carry ``name, megatron_name, row_kind, mode, metric, previous, current, gate, factor,
    gate_fraction, order, now_failing``. Order: verdict, regressions (rows that now fail first, in forward
    order, then by growth factor), drift, improvements.
    """
    if not previous:
        return []
    flags: list[dict] = []
    p_pass, c_pass = previous.get("passed"), current.get("passed")
    if p_pass is True and c_pass is False:
        flags.append(_flag("verdict", "regression", "verdict PASS → FAIL", previous=True, current=False))
    elif p_pass is False and c_pass is True:
        flags.append(_flag("verdict", "improvement", "verdict FAIL → PASS", previous=False, current=True))

    before = {S.row_key(r): r for r in S.modules(previous)}
    rows = S.modules(current)
    if not any(r.get("name") == "logits" for r in rows):  # older results: the logits summary as a row
        cur_lg, prev_lg = S.logits(current), S.logits(previous)
        if "rel_l2" in cur_lg and "rel_l2" in prev_lg:
            row = {"name": "logits", "mode": "summary", "rel_l2": cur_lg["rel_l2"]}
            rows = rows + [row]
            before[S.row_key(row)] = {**row, "rel_l2": prev_lg["rel_l2"]}
    found = [f for f in (_row_flag(r, before[S.row_key(r)]) for r in rows if S.row_key(r) in before) if f]
    rank = {"regression": 0, "drift": 1, "improvement": 2}
    def key(f: dict) -> tuple:  # rows that now fail in forward order (the first divergence leads), then growth
        order = f.get("order") if f["now_failing"] and f.get("order") is not None else math.inf
        return (rank[f["severity"]], not f["now_failing"], order,
                -(f["factor"] if f.get("factor") is not None else math.inf), str(f.get("name")))

    found.sort(key=key)
    return flags + found


def regressions(flags: list[dict]) -> list[dict]:
    return [f for f in flags if f["severity"] == "regression"]


def record(current: dict, previous: dict | None) -> dict:
    """What ``results.json`` stores about regressions: the previous run, the rule, and the flags."""
    flags = compare(current, previous)
    prev = None
    if previous is not None:
        prev = {"id": (previous.get("_run") or {}).get("id"), "created": previous.get("created"),
                "passed": previous.get("passed")}
    return {"previous": prev, "rule": RULE, "count": len(regressions(flags)),
            "drift": sum(1 for f in flags if f["severity"] == "drift"), "flags": flags}


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
    out: dict[int, dict | None] = {}
    for group in _groups(runs).values():
        for i, r in enumerate(group):
            out[id(r)] = group[i - 1] if i else None
    return out


def _groups(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs by ``run_key``, each group oldest first."""
    by_key: dict[tuple, list[dict]] = {}
    for r in runs:
        by_key.setdefault(S.run_key(r), []).append(r)
    for group in by_key.values():
        group.sort(key=_order_key)
    return by_key


def _ref(run: dict | None) -> dict | None:
    """A run as a link target: its id, its page relative to a sibling run's page, time and verdict."""
    if run is None:
        return None
    meta = run.get("_run") or {}
    rid = meta.get("id")
    return {"id": rid, "href": f"../{rid}/index.html" if rid else None, "created": run.get("created"),
            "passed": run.get("passed")}


def _env(run: dict) -> dict:
    return run.get("env") if isinstance(run.get("env"), dict) else {}


def _commit(env: dict) -> str | None:
    commit = env.get("git_commit")
    return None if not commit else str(commit)[:12] + (" (dirty)" if env.get("git_dirty") is True else "")


def _system_version(run: dict) -> str | None:
    system = run.get("system")
    return system.get("version") if isinstance(system, dict) else None


def changes(current: dict, before: dict | None) -> list[dict]:
    """What differs between ``before`` (the last passing run) and ``current``, each ``{kind, what, before, now}``:
    kind ``commit`` (the harness's commit range, ``before..now``), ``package`` (versions), ``environment`` (host,
    device, threads) or ``run`` (seed, config hash, the system's version, the case's gates and inputs)."""
    if before is None:
        return []
    ce, be = _env(current), _env(before)
    out = []

    def add(kind: str, what: str, old: Any, new: Any) -> None:
        if old != new:
            out.append({"kind": kind, "what": what, "before": None if old is None else str(old),
                        "now": None if new is None else str(new)})

    add("commit", "commit", _commit(be), _commit(ce))
    for k in PACKAGES:
        add("package", k.replace("_", "-"), be.get(k), ce.get(k))
    for k in ENVIRONMENT:
        add("environment", k.replace("_", " "), be.get(k), ce.get(k))
    for k in ("seed", "config_hash"):
        add("run", k.replace("_", " "), before.get(k), current.get(k))
    add("run", f"{S.system_of(current)} version", _system_version(before), _system_version(current))
    for k in ("gates", "inputs"):
        if before.get(k) != current.get(k) and before.get(k) is not None and current.get(k) is not None:
            changed = sorted(str(x) for x in set(before[k]) | set(current[k])
                             if before[k].get(x) != current[k].get(x)) if isinstance(before[k], dict) and \
                isinstance(current[k], dict) else []
            out.append({"kind": "run", "what": k, "before": None, "now": "changed: " + (", ".join(changed) or k)})
    return out


def run_links(current: dict, runs: list[dict]) -> dict:
    """Where "since when" lives for ``current``, among ``runs`` of the same case, system, device and dtype.

    ``{history, previous, last_pass, failing_since, streak, changed}``: hrefs relative to the run's own page
    (``runs/<id>/index.html``); ``last_pass`` is the latest passing run before ``current`` (None if none);
    ``failing_since`` the first run of the failing streak that ends at ``current`` (None when it passes);
    ``streak`` how many runs that streak holds; ``changed`` what differs since the last pass (``changes``) of a
    failing run.
    """
    key, me = S.run_key(current), _order_key(current)
    earlier = sorted((r for r in runs if r is not current and S.run_key(r) == key and _order_key(r) < me),
                     key=_order_key)
    last_pass = next((r for r in reversed(earlier) if r.get("passed") is True), None)
    since, streak = None, 0
    if current.get("passed") is False:
        since, streak = current, 1
        for r in reversed(earlier):
            if r.get("passed") is not False:
                break
            since, streak = r, streak + 1
    failing_since = _ref(since)
    if failing_since is not None:
        failing_since["self"] = since is current
    return {"history": "../../index.html", "previous": _ref(earlier[-1] if earlier else None),
            "last_pass": _ref(last_pass), "failing_since": failing_since, "streak": streak,
            "changed": changes(current, last_pass) if since is not None else []}


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
    bad = regressions(flags)
    drift = [f for f in flags if f["severity"] == "drift"]
    good = [f for f in flags if f["severity"] == "improvement"]
    parts = []
    if bad:
        tip = "\n".join(f["message"] for f in bad[:40]) + (f"\n… {len(bad) - 40} more" if len(bad) > 40 else "")
        parts.append(f'<span class="pill no">{len(bad)} regression{"s" if len(bad) != 1 else ""}</span>'
                     f'<div class="one" title="{_e(tip)}">{_e(bad[0]["message"])}</div>')
        if len(bad) > 1:
            parts.append(f'<div class="one" title="{_e(tip)}">{_e(bad[1]["message"])}</div>')
    if good:
        verdict = [f for f in good if f["kind"] == "verdict"]
        text = verdict[0]["message"] if verdict else f"{len(good)} row{'s' if len(good) != 1 else ''} pass again"
        parts.append(f'<span class="pill ok">{_e(text)}</span>')
    if drift:
        tip = "\n".join(f["message"] for f in drift[:40])
        parts.append(f' <span class="pill warn" title="{_e(tip)}">{len(drift)} drift</span>')
    return ("".join(parts) or '<span class="muted">none</span>'), len(bad)


def _trend_card(key: tuple[str, str, str, str], group: list[dict]) -> str:
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
    case, system, device, dtype = key
    sys_tag = f'<span class="tag">{_e(system)}</span>' if system != "parity" else ""
    return (f'<div class="card {"bad" if latest.get("passed") is False else "good"}">'
            f'<div style="display:flex;justify-content:space-between;align-items:center;gap:8px">'
            f'<div><b class="mono">{_e(case)}</b>{sys_tag} <span class="tag">{_e(device)}</span>'
            f'<span class="tag">{_e(dtype)}</span></div>{_verdict_pill(latest.get("passed"))}</div>'
            f'<div class="dots" title="verdicts, oldest → newest">{dots}</div>{"".join(rows)}'
            f'<div class="muted" style="font-size:12px;margin-top:4px">{len(group)} run'
            f'{"s" if len(group) != 1 else ""}, latest {_e(S.fmt_time(latest.get("created")))}</div></div>')


PAGE_SIZE = 200  # runs per page of the history table (the page flips in the browser; filters span all pages)


def _select(name: str, label: str, values: list[str]) -> str:
    opts = "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in values)
    return (f'<label>{_e(label)} <select data-hfilter="{_e(name)}"><option value="">all</option>{opts}</select>'
            '</label>')


def _wrap(x: Any) -> str:
    """An escaped name that may wrap after its dots and dashes (``<wbr>``), never inside a word."""
    return _e(x).replace(".", ".<wbr>").replace("-", "-<wbr>")


def _corrupt_row(c: dict) -> str:
    href = c.get("href")
    name = _e(c.get("id", "?"))
    link = f'<a href="{_e(href)}">{name}</a>' if href else name
    return (f'<tr class="bad corrupt" data-case="" data-system="" data-verdict="corrupt">'
            f'<td class="n" data-v="">{link}</td><td data-v="-1"><span class="pill warn big">CORRUPT</span></td>'
            f'<td colspan="7" class="mono">unreadable results.json: {_e(c.get("error", ""))}</td></tr>')


def _skip_row(k: dict) -> str:
    t = S.parse_time(k.get("created"))
    system = str(k.get("system") or "parity")
    sys_html = f' <span class="tag">{_e(system)}</span>' if system != "parity" else ""
    return (f'<tr class="skip" data-case="{_e(k.get("case", ""))}" data-system="{_e(system)}" data-verdict="SKIP" '
            f'data-regressions="0"><td class="n" data-v="{t.timestamp() if t else ""}" title="session '
            f'{_e(k.get("session") or "?")}">{_e(S.fmt_time(k.get("created")).removesuffix(" UTC"))}</td>'
            f'<td data-v="0.5"><span class="pill warn big">SKIP</span></td>'
            f'<td class="mono">{_wrap(k.get("id") or k.get("case", ""))}{sys_html}</td>'
            f'<td>{_e(k.get("device", ""))} · {_e(k.get("dtype", ""))}</td>'
            f'<td colspan="5" class="muted">not run: {_e(k.get("reason") or "no reason given")}</td></tr>')


def render_index(runs: list[dict], corrupt: list[dict] | None = None, skipped: list[dict] | None = None) -> str:
    """The history page: per-case trends, then every run newest first with its regressions and a link.

    ``runs`` are results dicts; a run's link is ``run["_run"]["href"]`` (set by ``store.load_runs``).
    ``corrupt`` lists run folders whose ``results.json`` cannot be read (``{id, href, error}``): they are
    listed as CORRUPT, not dropped. ``skipped`` lists the cases pytest sessions collected but did not run
    (``store.skips``: ``{id, case, system, device, dtype, reason, created}``): rows marked SKIP with the
    reason. The table filters by case, system and verdict and pages by ``PAGE_SIZE``.
    """
    runs = [r for r in runs if isinstance(r, dict)]
    corrupt = list(corrupt or [])
    skipped = [k for k in skipped or [] if isinstance(k, dict)]
    ordered = sorted(runs, key=_order_key, reverse=True)
    prev = previous_map(runs)
    n_fail = sum(1 for r in runs if r.get("passed") is False)
    groups: dict[tuple, list[dict]] = {}
    for r in ordered:
        groups.setdefault(S.run_key(r), []).append(r)

    bad_files = f' · <b>{len(corrupt)} corrupt</b>' if corrupt else ""
    bad_files += f' · {len(skipped)} skipped' if skipped else ""
    head = (f'<header class="banner"><div class="wrap"><div class="btitle"><h1>gemma4-parity · run history</h1>'
            f'<div class="meta">{len(runs)} run{"s" if len(runs) != 1 else ""} · {len(groups)} '
            f'case/system/device/dtype combination{"s" if len(groups) != 1 else ""} · {len(runs) - n_fail} passed · '
            f'{n_fail} failed{bad_files}</div></div>'
            f'<div class="bstats">latest<div class="big">'
            f'{_e(S.fmt_time(ordered[0].get("created")) if ordered else "—")}</div></div></div></header>')
    if not runs and not corrupt and not skipped:
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
        verdict = "PASS" if r.get("passed") is True else "FAIL" if fail else "?"
        system = S.system_of(r)
        when = _e(S.fmt_time(r.get("created")).removesuffix(" UTC"))
        when_html = f'<a href="{_e(href)}">{when}</a>' if href else when
        sys_html = f' <span class="tag">{_e(system)}</span>' if system != "parity" else ""
        trs.append(
            f'<tr class="{"bad" if fail else ""}" data-case="{_e(r.get("case", ""))}" data-system="{_e(system)}" '
            f'data-verdict="{verdict}" data-regressions="{n_bad}">'
            f'<td class="n" data-v="{run_time(r).timestamp() if run_time(r) != _EPOCH else ""}" '
            f'title="{_e(run_id)}">{when_html}</td>'
            f'<td data-v="{0 if fail else 1}">{_verdict_pill(r.get("passed"))}</td>'
            f'<td class="mono">{_wrap(r.get("case", ""))}{sys_html}</td>'
            f'<td>{_e(r.get("device", ""))} · {_e(r.get("dtype", ""))}</td>'
            f'<td class="mono{" red" if fd else ""}">{_wrap(fd) if fd else "<span class=muted>—</span>"}</td>'
            f'{_num_td(lg.get("rel_l2"))}{_num_td(lg.get("kl_max"))}{_num_td(S.worst_module_rel_l2(r))}'
            f'<td class="regs" data-v="{n_bad}">{reg_html}</td></tr>')
    dated = [(run_time(r).timestamp(), tr) for r, tr in zip(ordered, trs)]
    dated += [((S.parse_time(k.get("created")) or _EPOCH).timestamp(), _skip_row(k)) for k in skipped]
    trs = [_corrupt_row(c) for c in corrupt] + [tr for _, tr in sorted(dated, key=lambda d: -d[0])]
    cases = sorted({str(r.get("case", "")) for r in runs} | {str(k.get("case", "")) for k in skipped})
    systems = sorted({S.system_of(r) for r in runs} | {str(k.get("system") or "parity") for k in skipped})
    verdicts = ["PASS", "FAIL"] + (["SKIP"] if skipped else []) + (["corrupt"] if corrupt else [])
    filters = ('<div class="controls">' + _select("case", "case", cases) + _select("system", "system", systems)
               + _select("verdict", "verdict", verdicts)
               + '<label><input type="checkbox" data-hfilter="regressions"> with regressions</label>'
               f'<span class="pager" data-pager="runs" data-size="{PAGE_SIZE}"><button type="button" '
               'data-page="-1">‹ newer</button> <span class="pageinfo"></span> <button type="button" '
               'data-page="1">older ›</button></span></div>')
    cols = "".join(f'<col style="width:{w}%">' for w in (13, 6.5, 16, 10, 19, 7.5, 7.5, 7.5, 13))
    table = (f'<div class="tablewrap"><table class="sortable runs fixed" id="runs"><colgroup>{cols}</colgroup>'
             '<thead><tr>'
             '<th title="links to the run\'s report">time (UTC) · report</th><th>verdict</th><th>case</th>'
             '<th>device · dtype</th><th>first divergence</th><th>logits rel L2</th><th>logits KL max</th>'
             '<th title="largest rel L2 of any module row">worst rel L2</th>'
             f'<th title="{_e(RULE)}">regressions</th>'
             '</tr></thead><tbody>'
             + "".join(trs) + '</tbody></table></div>')
    body = (head + '<main class="wrap">'
            f'<section><h2>Trends<span class="sub">per case, system, device and dtype; oldest → newest; '
            f'red = failing run; log scale</span></h2><div class="trend">{trends}</div></section>'
            f'<section id="history"><h2>Runs<span class="sub">newest first; regressions are against the previous '
            f'run of the same case, system, device and dtype</span></h2>'
            f'<p class="muted" style="margin:0 0 8px;font-size:12.5px">{_e(RULE)}</p>{filters}{table}</section>'
            '<footer>Generated by parity.report. Self-contained: no scripts or resources are loaded from '
            'elsewhere.</footer></main>')
    return page("gemma4-parity · run history", body)
