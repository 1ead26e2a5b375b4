"""Summarise a cProfile dump of one run (used by ``gpu_check.sh --profile``): the top entries by cumulative and by own
time, and the probing families' seconds from the run's results.json, as one JSON record on stdout."""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pstats


def top(stats: pstats.Stats, key: str, n: int) -> list[dict]:
    stats.sort_stats(key)
    rows = []
    for func in stats.fcn_list:  # type: ignore[attr-defined]
        if len(rows) == n:
            break
        if func[0].startswith("<frozen") or func[2] in ("<built-in method builtins.exec>", "<module>"):
            continue  # the import machinery: its cost shows in the modules' own entries
        cc, nc, tt, ct, _ = stats.stats[func]  # type: ignore[attr-defined]
        where = f"{os.path.basename(func[0])}:{func[1]}({func[2]})"
        rows.append({"function": where, "calls": nc, "own_s": round(tt, 3), "cumulative_s": round(ct, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--results", help="a folder searched for results.json (probing families' seconds)")
    ap.add_argument("-n", type=int, default=40)
    a = ap.parse_args()
    stats = pstats.Stats(a.profile, stream=io.StringIO())
    out = {"total_s": round(stats.total_tt, 2),  # type: ignore[attr-defined]
           "by_cumulative": top(stats, "cumulative", a.n), "by_own_time": top(stats, "tottime", a.n)}
    if a.results:
        for path in sorted(glob.glob(os.path.join(a.results, "**", "results.json"), recursive=True)):
            r = json.load(open(path))
            fam = (r.get("probing") or {}).get("families") or {}
            out.setdefault("runs", []).append({
                "results": os.path.relpath(path, a.results), "phases": r.get("phases"),
                "probing_families_s": {k: round(v.get("seconds", 0.0), 2) for k, v in fam.items()},
                "probing_rows": {k: v.get("rows") for k, v in fam.items()}})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
