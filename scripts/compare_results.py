"""Compare two results.json files (a baseline and a new run of the same case): verdicts, every module row,
the logits summary and the round trip must be identical. Timings, creation time and provenance may differ.

    python scripts/compare_results.py BASE_DIR NEW_DIR [CASE ...] [--new-mode MODE ...]

Each DIR holds ``CASE/results.json``; prints one line per case and exits 1 if anything differs. ``--new-mode
MODE`` (e.g. ``probing``): the new run's rows of a mode the base run did not have are counted apart ("+N MODE
rows, F failing") and left out of the row comparison; the verdict fields (``passed``, ``checks``, the summary)
are still compared, so a new row that fails shows there.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROW_KEYS = ("name", "mode", "kind", "megatron_name", "cosine", "rel_l2", "max_abs", "p99_abs", "floor", "gate",
            "passed", "ratio", "order", "layer", "group", "gate_class", "nonfinite", "router", "detail", "why", "truth_rel_l2")
SAME = ("case", "passed", "device", "dtype", "seed", "checks", "config_hash", "layer_types", "routers", "gates",
        "parallel", "sequential", "hf_released_before_megatron", "inputs", "groups")


def _eq(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return a == b


def split_new(results: dict, new_modes: tuple[str, ...]) -> tuple[dict, list[dict]]:
    """``results`` without the rows of ``new_modes`` (and those rows): what a base run without them compares to."""
    rows = [m for m in results["modules"] if m.get("mode") in new_modes]
    summary = dict(results["summary"])  # the counts without them
    summary["n_modules"] = summary.get("n_modules", 0) - len(rows)
    summary["n_failed"] = summary.get("n_failed", 0) - sum(not m["passed"] for m in rows)
    return {**results, "summary": summary,
            "modules": [m for m in results["modules"] if m.get("mode") not in new_modes]}, rows


def differences(base: dict, new: dict) -> list[str]:
    out = [f"{k}: {base.get(k)!r} -> {new.get(k)!r}" for k in SAME if not _eq(base.get(k), new.get(k))]
    if not _eq(base["summary"], new["summary"]):
        keys = set(base["summary"]) | set(new["summary"])
        out += [f"summary.{k} differs" for k in sorted(keys) if not _eq(base["summary"].get(k), new["summary"].get(k))]
    if not _eq(base["roundtrip"], new["roundtrip"]):
        out.append("roundtrip differs")
    a, b = base["modules"], new["modules"]
    if len(a) != len(b):
        out.append(f"{len(a)} module rows -> {len(b)}")
    # rows matched by (name, mode, megatron_name, probe): HF computes its RoPE tables in the iteration order of a set
    # of layer-type strings, which varies with the process's hash seed; the pipeline lists them in table order
    new_rows = {_key(y): y for y in b}
    for i, x in enumerate(a):
        y = new_rows.get(_key(x))
        bad = ["(missing)"] if y is None else [k for k in ROW_KEYS if not _eq(x.get(k), y.get(k))]
        if bad:
            out.append(f"row {i} {x.get('name')} ({x.get('mode')}): {', '.join(bad)} differ")
    moved = [i for i, (x, y) in enumerate(zip(a, b)) if _key(x) != _key(y)]
    if moved and not all(a[i]["kind"] == "rope" for i in moved):
        out.append(f"row order differs at {moved[:5]}")
    return out


def _key(row: dict) -> tuple:
    return row.get("name"), row.get("mode"), row.get("megatron_name"), row.get("probe")  # probing: one row per probe


def main(argv: list[str]) -> int:
    new_modes = tuple(argv[i + 1] for i, a in enumerate(argv) if a == "--new-mode")
    argv = [a for i, a in enumerate(argv) if a != "--new-mode" and (i == 0 or argv[i - 1] != "--new-mode")]
    base_dir, new_dir, *cases = argv
    cases = cases or sorted(p.parent.name for p in Path(base_dir).glob("*/results.json"))
    failed = False
    for case in cases:
        base = json.loads((Path(base_dir) / case / "results.json").read_text())
        new, added = split_new(json.loads((Path(new_dir) / case / "results.json").read_text()), new_modes)
        diff = differences(base, new)
        failed |= bool(diff)
        extra = f", +{len(added)} {'/'.join(new_modes)} rows, {sum(not m['passed'] for m in added)} failing" \
            if new_modes else ""
        print(f"{case}: {'IDENTICAL' if not diff else 'DIFFERENT'} ({len(new['modules'])} module rows{extra}, passed "
              f"{new['passed']}, logits rel_l2 {new['summary']['logits'].get('rel_l2')}, round trip "
              f"{new['roundtrip']['bit_exact']}/{new['roundtrip']['tensors']})")
        for line in diff[:20]:
            print("   ", line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
