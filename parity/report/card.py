"""A verification card: what a report root proves, as YAML a Megatron-Bridge user can attach to a model card.

    python -m parity card --dir REPORTS [--since ISO-TIME] [--junit junit.xml] [--out card.yaml]
                          [--fail-on-regression]           (also: python -m parity.report.card ...)

The card covers the runs created at or after ``--since`` (a nightly passes its start time), else the latest
run of every case, system, device and dtype. For each run: case, system, device, dtype, seed, verdict, the
per-check results, first divergence, logits metrics, module rows (failing, closest to its gate), the weight
round trip (tensors, bit-exact), regressions against the previous run of the same case/system/device/dtype
(``history.compare``), the command and versions, and the report's path. ``--junit`` adds the test counts of
a JUnit XML file. Exit status: 0 when every covered run passed (and, with ``--fail-on-regression``, none
regressed), 1 otherwise or when no run is covered, 2 on bad usage.
"""
from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parity.report import summary as S
from parity.report.history import RULE, compare, previous_map, regressions
from parity.report.store import REPORT, RUNS, scan

VERSION_KEYS = ("python", "torch", "transformers", "megatron_core", "megatron_bridge", "numpy", "safetensors")


def _stamp_time(run_id: str) -> datetime | None:
    """The UTC time in a run folder's name (``20260509T090000123Z-...``), for runs whose results are unreadable."""
    try:
        return datetime.strptime(run_id[:19], "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def select(runs: list[dict], since: datetime | None) -> list[dict]:
    """Runs created at or after ``since`` (oldest first), else the latest run of every comparable group."""
    if since is not None:
        chosen = [r for r in runs if (S.parse_time(r.get("created")) or datetime.min.replace(tzinfo=timezone.utc))
                  >= since]
    else:
        latest: dict[tuple, dict] = {}
        for r in runs:  # load_runs: newest first
            latest.setdefault(S.run_key(r), r)
        chosen = list(latest.values())
    return sorted(chosen, key=lambda r: (str(r.get("created") or ""), r["_run"]["id"]))


def _versions(env: dict) -> dict:
    return {k: env[k] for k in VERSION_KEYS if env.get(k) is not None}


def _number(x: Any) -> Any:
    v = S.num(x)
    return None if v is None else (float(f"{v:.6g}") if v == v and abs(v) != float("inf") else str(v))


def run_entry(run: dict, previous: dict | None) -> dict:
    env = run.get("env") if isinstance(run.get("env"), dict) else {}
    rows = S.modules(run)
    lg = S.logits(run)
    rt = run.get("roundtrip") if isinstance(run.get("roundtrip"), dict) else {}
    flags = compare(run, previous)
    tight = S.tightest(run)
    checks = run.get("checks") if isinstance(run.get("checks"), dict) else {}
    fd = S.first_divergence(run)
    return {
        "case": run.get("case"), "system": S.system_of(run), "device": run.get("device"),
        "device_name": env.get("device_name"), "dtype": run.get("dtype"), "seed": run.get("seed"),
        "created": run.get("created"), "passed": run.get("passed"),
        "checks": {k: ("pass" if v is True else "fail" if v is False else "n/a") for k, v in checks.items()},
        "first_divergence": None if fd is None else {
            "module": fd.get("name"), "megatron": fd.get("megatron_name"), "mode": fd.get("mode"),
            "metric": fd.get("metric"), "value": _number(fd.get("value")), "gate": fd.get("gate")},
        "logits": {k: _number(lg.get(k)) for k in ("cosine", "rel_l2", "kl_max", "kl_mean", "top1_agreement")
                   if k in lg},
        "modules": {"rows": len(rows), "failed": sum(1 for r in rows if r.get("passed") is False),
                    "closest_to_gate": None if tight is None else {
                        "module": tight.get("name"), "mode": tight.get("mode"),
                        "gate_use": _number(S.gate_usage(tight))}},
        "roundtrip": {"tensors": rt.get("tensors"), "bit_exact": rt.get("bit_exact"),
                      "max_abs_diff": _number(rt.get("max_abs_diff"))} if rt else None,
        "regressions": {"previous_run": ((previous or {}).get("_run") or {}).get("id"),
                        "count": len(regressions(flags)),
                        "drift": sum(1 for f in flags if f["severity"] == "drift"),
                        "flags": [f["message"] for f in regressions(flags)][:20]},
        "command": env.get("command"), "versions": _versions(env),
        "harness_commit": env.get("git_commit"), "harness_dirty": env.get("git_dirty"),
        "report": f"{RUNS}/{run['_run']['id']}/{REPORT}",
    }


def junit_counts(path: Path) -> dict:
    """Totals of a JUnit XML file, plus the names of failing or erroring tests."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0) or 0) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failing = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
    return {**total, "failing": failing}


def build(root: Path, since: datetime | None = None, junit: Path | None = None) -> dict:
    """The card of ``root`` as a dict (see the module docstring)."""
    root = Path(root)
    runs, corrupt = scan(root)
    prev = previous_map(runs)
    chosen = select(runs, since)
    entries = [run_entry(r, prev.get(id(r))) for r in chosen]
    corrupt = [c for c in corrupt if since is None or (_stamp_time(c["id"]) or since) >= since]
    versions = [e["versions"] for e in entries]
    commands = list(dict.fromkeys(e["command"] for e in entries if e["command"]))
    card: dict[str, Any] = {
        "verification_card": {
            "tool": "gemma4-parity", "what": "module-by-module parity of a Megatron-core Gemma 4 against "
            "Hugging Face transformers (reference), plus HF -> Megatron -> HF weight round trips",
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "report_root": str(root), "history": REPORT,
            "since": since.strftime("%Y-%m-%dT%H:%M:%SZ") if since else None,
            "passed": bool(entries) and all(e["passed"] is True for e in entries) and not corrupt,
            "totals": {"runs": len(entries), "passed": sum(1 for e in entries if e["passed"] is True),
                       "failed": sum(1 for e in entries if e["passed"] is not True),
                       "regressions": sum(e["regressions"]["count"] for e in entries), "corrupt": len(corrupt),
                       "roundtrip_tensors": sum(e["roundtrip"]["tensors"] or 0 for e in entries if e["roundtrip"]),
                       "roundtrip_bit_exact": sum(e["roundtrip"]["bit_exact"] or 0 for e in entries
                                                  if e["roundtrip"])},
            "versions": versions[0] if versions and all(v == versions[0] for v in versions) else "per run",
            "commands": commands, "regression_rule": RULE,
            "runs": entries,
            "corrupt_runs": [{"run": c["id"], "error": c["error"]} for c in corrupt],
        }
    }
    if junit is not None:
        card["verification_card"]["junit"] = {"file": str(junit), **junit_counts(junit)}
    return card


def dumps(card: dict) -> str:
    import yaml  # PyYAML: a dependency of transformers

    class _Plain(yaml.SafeDumper):  # no &anchors / *aliases for values that happen to be shared
        def ignore_aliases(self, data: Any) -> bool:
            return True

    return yaml.dump(card, Dumper=_Plain, sort_keys=False, allow_unicode=True, width=120)


def _parse_since(text: str) -> datetime:
    t = S.parse_time(text)
    if t is None:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r} (e.g. 2026-05-09T02:00:00Z)")
    return t


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The card's options (shared by ``python -m parity card`` and ``python -m parity.report.card``)."""
    parser.add_argument("--dir", type=Path, default=None, help="report root (default: $PARITY_REPORTS_DIR or reports)")
    parser.add_argument("--since", type=_parse_since, help="cover runs created at or after this UTC time")
    parser.add_argument("--junit", type=Path, help="JUnit XML of the same session, for its test counts")
    parser.add_argument("--out", type=Path, help="write the card here (default: stdout)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a covered run regressed")


def run(args: argparse.Namespace) -> int:
    """Build, write and judge the card for parsed ``args`` (see ``add_arguments``); returns the exit status."""
    root = args.dir or Path(os.environ.get("PARITY_REPORTS_DIR") or "reports")
    if not root.is_dir():
        print(f"parity card: error: no report directory {root}", file=sys.stderr)
        return 2
    if args.junit is not None and not args.junit.is_file():
        print(f"parity card: error: no JUnit file {args.junit}", file=sys.stderr)
        return 2
    try:
        card = build(root, args.since, args.junit)
    except ET.ParseError as e:
        print(f"parity card: error: {args.junit}: not JUnit XML ({e})", file=sys.stderr)
        return 2
    text = dumps(card)
    c = card["verification_card"]
    t = c["totals"]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"verification card: {args.out} ({t['runs']} runs, {t['passed']} passed, {t['failed']} failed, "
              f"{t['regressions']} regressions, {t['corrupt']} corrupt)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    ok = c["passed"] and not (args.fail_on_regression and t["regressions"])
    if args.junit is not None:
        j = c["junit"]
        ok = ok and not (j["failures"] or j["errors"])
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parity card", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
