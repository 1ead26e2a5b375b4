"""Summarise a cProfile dump of one run (used by ``gpu_check.sh --profile``): the top entries by cumulative and by own
time, who calls the top entries by own time, and the probing families' seconds from the run's results.json, as one JSON record on stdout."""
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
        rows.append({"function": _where(func), "calls": nc, "own_s": round(tt, 3), "cumulative_s": round(ct, 3)})
    return rows


def callers(stats: pstats.Stats, n: int, per: int = 8) -> dict:
    """For each of the ``n`` entries with the most own time, its ``per`` callers with the most time spent in it on
    their behalf (a ``tensor.to`` says nothing until one knows whose copies they are)."""
    stats.sort_stats("tottime")
    out = {}
    for func in stats.fcn_list[:n]:  # type: ignore[attr-defined]
        _, _, _, _, by = stats.stats[func]  # type: ignore[attr-defined]
        rows = sorted(by.items(), key=lambda kv: -kv[1][2])[:per]  # (caller, (cc, nc, tt, ct))
        out[_where(func)] = [{"caller": _where(c), "calls": v[1], "own_s": round(v[2], 3), "cumulative_s": round(v[3], 3)}
                             for c, v in rows]
    return out


def _where(func) -> str:
    return f"{os.path.basename(func[0])}:{func[1]}({func[2]})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--results", help="a folder searched for results.json (probing families' seconds)")
    ap.add_argument("-n", type=int, default=40)
    a = ap.parse_args()
    stats = pstats.Stats(a.profile, stream=io.StringIO())
    out = {"total_s": round(stats.total_tt, 2),  # type: ignore[attr-defined]
           "by_cumulative": top(stats, "cumulative", a.n), "by_own_time": top(stats, "tottime", a.n),
           "callers_of_top_own": callers(stats, 12)}
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
