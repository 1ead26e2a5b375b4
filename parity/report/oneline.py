"""One line per run for terminals and CI logs: verdict, first divergence, regressions, report and history.

    gemma4-text-tiny on cpu in float32: parity HOLDS · first divergence: none · regressions: 0 (3 drift) ·
    report: reports/runs/<id>/index.html · history: reports/index.html

(one line; wrapped here). Regressions come from the run's stored record (``results["regressions"]``, written
by ``store.write_run``); a report written with ``--out`` has no history, and the line says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from parity.report import summary as S
from parity.report.store import RESULTS, read_results


def fmt_num(x: Any) -> str:
    """A metric for a terminal line: 3 significant digits, ``n/a`` when missing."""
    v = S.num(x)
    if v is None:
        return "n/a"
    return "0" if v == 0 else f"{v:.3g}"


def divergence(results: dict) -> str:
    """``model.layers.2.self_attn = megatron decoder.layers.2.self_attention (isolated; rel_l2 0.892 > gate
    1e-05)``, or ``none``."""
    summary = results.get("summary") or {}
    first = summary.get("first_divergence")
    if not first:
        return "none"
    d = summary.get("first_divergence_detail") or {}
    gate = d.get("gate")
    limit = gate.get("max") if isinstance(gate, dict) else gate
    parts = [str(d["mode"]) + (f" on {d['probe']}" if d.get("probe") else "")] if d.get("mode") else []
    value = S.num(d.get("value"))
    if d.get("metric") and (value is None and not d.get("why") or value is not None and S.num(limit) is not None
                            and value > S.num(limit)):  # a row failing for a stated reason shows that reason
        parts.append(f"{d['metric']} {fmt_num(d.get('value'))} > gate {fmt_num(limit)}")
    if d.get("why"):
        parts.append(str(d["why"]))
    twin = f" = megatron {d['megatron_name']}" if d.get("megatron_name") else ""
    return f"{first}{twin}" + (f" ({'; '.join(parts)})" if parts else "")


def regressions_text(record: dict | None) -> str:
    if not isinstance(record, dict):
        return "regressions: no history (--out)"
    if record.get("previous") is None:
        return "regressions: none (first run of this case/system/device/dtype)"
    drift = record.get("drift") or 0
    return f"regressions: {record.get('count', 0)}" + (f" ({drift} drift)" if drift else "")


def stored_regressions(report: Path | str | None) -> dict | None:
    """The regression record next to a report page (``results.json`` of its run folder), if any."""
    if report is None:
        return None
    try:
        return read_results(Path(report).parent / RESULTS).get("regressions")
    except (OSError, ValueError):
        return None


def summary_line(results: dict, report: Path | str | None = None, history: Path | str | None = None,
                 record: dict | None = None) -> str:
    """The run's one line (see the module docstring); ``record`` defaults to the one stored beside ``report``."""
    checks = results.get("checks") if isinstance(results.get("checks"), dict) else {}
    failed = [k for k, ok in checks.items() if not ok]
    verdict = "parity HOLDS" if results.get("passed") else (
        "parity FAILS" + (f" ({', '.join(failed)} failed)" if failed else ""))
    record = record if record is not None else stored_regressions(report)
    parts = [f"{results.get('case')} on {results.get('device')} in {results.get('dtype')}: {verdict}",
             f"first divergence: {divergence(results)}"]
    failures = (results.get("summary") or {}).get("failures") or []
    if failures:  # the system raised: the first such phase (all of them are in the report)
        parts.append(str(failures[0]) + (f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""))
    parts.append(regressions_text(record))
    if report is not None:
        parts.append(f"report: {report}")
    if history is not None:
        parts.append(f"history: {history}")
    return " · ".join(parts)


def no_case_ran(skips: list[dict]) -> str:
    """``no case ran: a, b (needs CUDA); c (needs a checkpoint: ...)``: every skip (``{id, case,
    reason}``), grouped by reason (the case name a reason ends with is dropped: the id says it)."""
    groups: dict[str, list[str]] = {}
    for k in skips:
        reason = str(k.get("reason") or "skipped").replace(f" (case {k.get('case')})", "")
        groups.setdefault(reason, []).append(str(k.get("id") or k.get("case")))
    return "no case ran: " + "; ".join(f"{', '.join(ids)} ({reason})" for reason, ids in groups.items())
