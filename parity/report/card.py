"""A verification card: what a report root proves, as YAML a model-card author can attach to a model card.

    python -m parity card --dir REPORTS [--since ISO-TIME] [--junit junit.xml] [--out card.yaml]
                          [--fail-on-regression]           (also: python -m parity.report.card ...)

The card covers the runs created at or after ``--since`` (a nightly passes its start time), else the latest
run of every case, system, device and dtype; and the cases pytest sessions collected but did not run
(``store.sessions``: those of the window, else of the latest session), each with its reason. For each run:
case, system, device, dtype, seed, verdict; the model's identity (config hash, random or checkpoint weights,
the checkpoint folder), the inputs (tokens, lengths), the gates that judged it, a one-line reproducer; per
check its result and the row that tells the most (the first divergence when the check fails, the row closest
to its gate when it passes); logits metrics, the weight round trip, regressions against the previous run of
the same case/system/device/dtype (``history.compare``), the command, versions and the report's path
(relative to the report root). ``--junit`` adds the test counts of a JUnit XML file. The layout is
``docs/nightly/card-schema.json`` (JSON Schema; ``schema_errors`` checks a card against it).

Exit status (``EXIT``), the same as ``scripts/nightly.sh``'s: 0 every covered run passed (regressions are
listed); 1 a parity failure (a failing or corrupt run, a run that raised, a failing JUnit test); 2 no case
ran ("no case ran: ..." on stderr with every skip and its reason), or bad usage; 5 a regression against the
previous run with ``--fail-on-regression`` (and no failure).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from parity.engine.modes import get as get_mode, rank
from parity.report import summary as S
from parity.report.history import PACKAGES, RULE, compare, previous_map, regressions
from parity.report.oneline import no_case_ran
from parity.report.store import REPORT, RUNS, atomic_write, scan, sessions, skips

VERSION_KEYS = PACKAGES
EXIT = {"pass": 0, "fail": 1, "nothing_ran": 2, "regression": 5}  # "regression" only with --fail-on-regression
SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "nightly" / "card-schema.json"


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


def _row(row: dict, why: str) -> dict:
    """A compared row as the card shows it: module, mode, metric, value, gate, the share of the gate it uses."""
    gate = row.get("gate") if isinstance(row.get("gate"), dict) else {}
    metric = str(gate.get("metric") or "rel_l2")
    return {"module": row.get("name"), "megatron": row.get("megatron_name"), "mode": row.get("mode"),
            "metric": metric, "value": _number(row.get(metric)), "gate": S.gate_text(gate) or None,
            "gate_use": _number(S.gate_usage(row)), "why": why}


CHECK_ROWS = {"logits": lambda r: r.get("kind") == "logits", "router": lambda r: r.get("kind") == "router",
              "modules": lambda r: r.get("kind") != "router"}  # the rows each check judges (gates.summarise)


def check_row(run: dict, check: str, passed: Any) -> dict | None:
    """The row that tells the most about ``check``: when it fails, its first divergence (the engine's own for
    ``modules``, else the first failing row in forward order, the mode of lowest rank first); when it passes, the
    row closest to its gate. None when no row says more (every row exactly 0, or no row)."""
    if check == "roundtrip":
        rt = run.get("roundtrip") if isinstance(run.get("roundtrip"), dict) else {}
        bad = [r for r in rt.get("rows") or [] if isinstance(r, dict) and r.get("bit_exact") is not True]
        return None if passed is not False or not bad else {
            "module": bad[0].get("name"), "megatron": None, "mode": "roundtrip", "metric": "max_abs_diff",
            "value": _number(bad[0].get("max_abs_diff")), "gate": "bit-exact", "gate_use": None,
            "why": "first divergence"}
    keep = CHECK_ROWS.get(check)
    rows = [r for r in S.modules(run) if keep is not None and keep(r) and isinstance(r.get("gate"), dict)]
    lg = S.logits(run)
    if check == "logits" and S.num(lg.get("kl_gate")) is not None and S.num(lg.get("kl_max")) is not None:
        rows.append({"name": "logits", "mode": "end_to_end", "kind": "logits", "kl_max": lg["kl_max"],
                     "gate": {"metric": "kl_max", "max": lg["kl_gate"]}, "order": math.inf,
                     "passed": S.num(lg["kl_max"]) <= S.num(lg["kl_gate"])})
    if passed is False:
        fd = S.first_divergence(run)
        named = [r for r in rows if fd and r.get("name") == fd.get("name") and r.get("mode") == fd.get("mode")
                 and r.get("passed") is False]
        failing = named if check == "modules" and named else [r for r in rows if r.get("passed") is False]
        if not failing:
            return None
        first = min(failing, key=lambda r: (S.num(r.get("order")) if S.num(r.get("order")) is not None
                                            else math.inf, rank(str(r.get("mode")))))
        return _row(first, "first divergence")
    used = [(u, r) for r in rows if (u := S.gate_usage(r)) is not None and u > 0]
    return _row(max(used, key=lambda t: t[0])[1], "closest to its gate") if used else None


def model_identity(run: dict) -> dict:
    """What was compared: config hash, random or checkpoint weights, the builder, the checkpoint folder."""
    m = run.get("model") if isinstance(run.get("model"), dict) else {}
    return {"config_hash": run.get("config_hash"), "weights": m.get("weights") or "unknown",
            "builder": m.get("builder"), "checkpoint": m.get("checkpoint")}


INPUT_KEYS = ("batch", "seq_len", "lengths", "padding", "pad_tail", "position_offset", "num_images",
              "soft_tokens_per_image", "sliding_window")


def inputs(run: dict) -> dict:
    """The inputs: batch, sequence length, tokens compared (the sum of the unpadded lengths), lengths, padding."""
    i = run.get("inputs") if isinstance(run.get("inputs"), dict) else {}
    lengths = i.get("lengths")
    if isinstance(lengths, list) and all(isinstance(n, int) for n in lengths):
        tokens = sum(lengths)
    else:
        tokens = i["batch"] * i["seq_len"] if isinstance(i.get("batch"), int) and isinstance(i.get("seq_len"), int) \
            else None
    return {"tokens": tokens, **{k: i[k] for k in INPUT_KEYS if k in i}}


def gates_used(run: dict) -> dict:
    """The case's gate sections that judged this run: its dtype's, float32's where a mode gates in fp32 (the fp32
    replay), and the modules gated exactly."""
    gates = run.get("gates") if isinstance(run.get("gates"), dict) else {}
    used = [str(run.get("dtype"))]
    for m in run.get("modes") or []:
        mode = get_mode(m.get("name")) if isinstance(m, dict) and m.get("ran") else None
        if mode is not None and mode.gates != "run" and mode.gates not in used:
            used.append(mode.gates)
    out = {k: gates[k] for k in used if isinstance(gates.get(k), dict)}
    if gates.get("exact"):
        out["exact"] = list(gates["exact"])
    return out


def reproducer(run: dict) -> str:
    """One command that reruns this run: case, device, dtype, seed, checkpoint and system."""
    args = ["python", "-m", "parity", "run", "--case", str(run.get("case")), "--device", str(run.get("device")),
            "--dtype", str(run.get("dtype"))]
    if run.get("seed") is not None:
        args += ["--seed", str(run["seed"])]
    checkpoint = model_identity(run)["checkpoint"]
    if checkpoint:
        args += ["--checkpoint", str(checkpoint)]
    if S.system_of(run) != "parity":
        args += ["--system", S.system_of(run)]
    return shlex.join(args)


def run_entry(run: dict, previous: dict | None) -> dict:
    env = run.get("env") if isinstance(run.get("env"), dict) else {}
    rows = S.modules(run)
    lg = S.logits(run)
    rt = run.get("roundtrip") if isinstance(run.get("roundtrip"), dict) else {}
    flags = compare(run, previous)
    checks = run.get("checks") if isinstance(run.get("checks"), dict) else {}
    fd = S.first_divergence(run)
    return {
        "case": run.get("case"), "system": S.system_of(run), "device": run.get("device"),
        "device_name": env.get("device_name"), "dtype": run.get("dtype"), "seed": run.get("seed"),
        "created": run.get("created"), "passed": run.get("passed"),
        "model": model_identity(run), "inputs": inputs(run), "gates": gates_used(run),
        "reproduce": reproducer(run),
        "checks": {k: {"result": "pass" if v is True else "fail" if v is False else "n/a",
                       "row": check_row(run, k, v)} for k, v in checks.items()},
        "first_divergence": None if fd is None else {
            "module": fd.get("name"), "megatron": fd.get("megatron_name"), "mode": fd.get("mode"),
            "metric": fd.get("metric"), "value": _number(fd.get("value")), "gate": fd.get("gate")},
        "logits": {k: _number(lg.get(k)) for k in ("cosine", "rel_l2", "kl_max", "kl_mean", "top1_agreement")
                   if k in lg},
        "modules": {"rows": len(rows), "failed": sum(1 for r in rows if r.get("passed") is False)},
        "roundtrip": {"tensors": rt.get("tensors"), "bit_exact": rt.get("bit_exact"),
                      "max_abs_diff": _number(rt.get("max_abs_diff"))} if rt else None,
        **({"lora": lora_entry(run["lora"])} if isinstance(run.get("lora"), dict) else {}),
        "regressions": {"previous_run": ((previous or {}).get("_run") or {}).get("id"),
                        "count": len(regressions(flags)),
                        "drift": sum(1 for f in flags if f["severity"] == "drift"),
                        "flags": [f["message"] for f in regressions(flags)][:20]},
        "command": env.get("command"), "versions": _versions(env),
        "harness_commit": env.get("git_commit"), "harness_dirty": env.get("git_dirty"),
        "report": f"{RUNS}/{run['_run']['id']}/{REPORT}",
    }


def lora_entry(lora: dict) -> dict:
    """A LoRA case's card entry: its adapters, and every adapter tensor of the system's exports accounted for."""
    def counts(c):
        return None if not isinstance(c, dict) else {
            "hf": c.get("hf"), "exported": c.get("exported"), "bit_exact": c.get("bit_exact"),
            "missing": len(c.get("missing") or []), "extra": len(c.get("extra") or [])}
    rel = lambda k: _number((lora.get(k) or {}).get("vs_peft_rel_l2"))  # noqa: E731
    return {"targets": lora.get("targets"), "r": lora.get("r"), "alpha": lora.get("alpha"),
            "adapter_export": counts(lora.get("export")), "merged_export": counts(lora.get("merged")),
            "export_loads": lora.get("export_loads", False), "export_logits_rel_l2": rel("export_logits"),
            "merged_logits_rel_l2": rel("merged_logits")}


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
    records = sessions(root)
    covered = records[:1] if since is None else [s for s in records
                                                 if (S.parse_time(s.get("created")) or since) >= since]
    skipped = [{k: s.get(k) for k in ("id", "case", "system", "device", "dtype", "reason", "created")}
               for s in skips(covered)]
    errored = [{"id": e.get("id"), "case": e.get("case"), "error": e.get("error")} for s in covered
               for e in s.get("errors") or [] if isinstance(e, dict)]
    versions = [e["versions"] for e in entries]
    commands = list(dict.fromkeys(e["command"] for e in entries if e["command"]))
    n_regressions = sum(e["regressions"]["count"] for e in entries)
    card: dict[str, Any] = {
        "verification_card": {
            "tool": "gemma4-parity", "what": "module-by-module parity of a Megatron-core Gemma 4 against "
            "Hugging Face transformers (reference), plus HF -> Megatron -> HF weight round trips",
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "report_root": str(root), "history": REPORT,
            "since": since.strftime("%Y-%m-%dT%H:%M:%SZ") if since else None,
            "passed": None, "outcome": None,
            "totals": {"runs": len(entries), "passed": sum(1 for e in entries if e["passed"] is True),
                       "failed": sum(1 for e in entries if e["passed"] is not True),
                       "skipped": len(skipped), "errored": len(errored),
                       "regressions": n_regressions, "corrupt": len(corrupt),
                       "roundtrip_tensors": sum(e["roundtrip"]["tensors"] or 0 for e in entries if e["roundtrip"]),
                       "roundtrip_bit_exact": sum(e["roundtrip"]["bit_exact"] or 0 for e in entries
                                                  if e["roundtrip"])},
            "versions": versions[0] if versions and all(v == versions[0] for v in versions) else "per run",
            "commands": commands, "regression_rule": RULE,
            "runs": entries,
            "skipped": skipped,
            "errored": errored,
            "corrupt_runs": [{"run": c["id"], "error": c["error"]} for c in corrupt],
        }
    }
    c = card["verification_card"]
    if junit is not None:
        c["junit"] = {"file": str(junit), **junit_counts(junit)}
    junit_bad = junit is not None and bool(c["junit"]["failures"] or c["junit"]["errors"])
    if any(e["passed"] is not True for e in entries) or corrupt or errored or junit_bad:
        c["outcome"] = "fail"
    elif not entries:
        c["outcome"] = "nothing_ran"
    else:
        c["outcome"] = "regression" if n_regressions else "pass"
    c["passed"] = c["outcome"] in ("pass", "regression")
    return card


def nothing_ran(card: dict) -> str:
    """``no case ran: <case>: <reason>; ...`` (every skip of the card), for a card that covers no run."""
    c = card["verification_card"]
    if c["skipped"]:
        return no_case_ran(c["skipped"])
    where = f"{c['report_root']} since {c['since']}" if c["since"] else c["report_root"]
    return f"no case ran: no run in {where}, and no pytest session recorded a skip"


def schema_errors(value: Any, schema: dict | None = None, where: str = "card", root: dict | None = None) -> list[str]:
    """Where ``value`` departs from ``schema`` (default: ``SCHEMA``, the documented layout). The JSON Schema
    keywords the schema uses: type, enum, properties, required, additionalProperties, items, $ref to $defs."""
    if schema is None:
        schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    root = root or schema
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
             "integer": int, "number": (int, float)}
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types
    if types and not any(isinstance(value, kinds[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                         for t in types):
        return [f"{where}: {type(value).__name__} {value!r:.60}, expected {' or '.join(types)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{where}.{k}", root)
            elif extra is False:
                errors.append(f"{where}: unexpected key {k!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(v, extra, f"{where}.{k}", root)
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]", root)
    return errors


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
        atomic_write(args.out, text)
        print(f"verification card: {args.out} ({t['runs']} runs, {t['passed']} passed, {t['failed']} failed, "
              f"{t['skipped']} skipped, {t['errored']} errored, {t['regressions']} regressions, "
              f"{t['corrupt']} corrupt)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if c["outcome"] == "nothing_ran":
        print(f"parity card: {nothing_ran(card)}", file=sys.stderr)
    if c["outcome"] == "regression" and not args.fail_on_regression:
        return EXIT["pass"]
    return EXIT[c["outcome"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parity card", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
