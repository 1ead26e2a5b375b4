"""Probe: do Megatron-Bridge's verdicts move when its fused activations always run compiled, as in its training?

megatron-core wraps its fused activations in ``jit_fuser`` (``torch.compile``). A parity run calls them on many
shapes (the end-to-end forward, each module alone, the fp32 replay, the backward), so dynamo recompiles until its
recompile limit (8) and then runs them eager; a bf16 gelu rounds differently the two ways. Training runs one shape:
always compiled. This runs ``--case`` with Megatron-Bridge twice in one process, fresh compile caches each time:
with dynamo's default limit, then with a limit no run reaches (every call compiled), and writes which rows and
verdicts differ. Prints JSON (and writes it with ``--out``).

    python scripts/probe_bridge_compiled.py [--case gemma4-text-tiny-train-bf16] [--out bench/probe-bridge-compiled-cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="gemma4-text-tiny-train-bf16")
    ap.add_argument("--out")
    a = ap.parse_args()
    import torch._dynamo.config as dc
    from torch._dynamo.utils import counters

    from parity.cases import load_case
    from parity.engine import pipeline
    from parity.engine.launch import cpu_threads
    from parity.engine.pipeline import env_info

    case, runs, limits = load_case(a.case), {}, {}
    default = dc.recompile_limit
    for label, limit in (("default", default), ("always_compiled", 100_000)):
        dc.recompile_limit = dc.cache_size_limit = limit
        dc.accumulated_recompile_limit = dc.accumulated_cache_size_limit = max(limit, 256)
        t0 = time.perf_counter()
        counters.clear()
        with cpu_threads("cpu"):
            runs[label] = pipeline.run(case, device="cpu", system="megatron-bridge")
        limits[label] = {"recompile_limit": limit, "wall_s": round(time.perf_counter() - t0, 1),
                         "dynamo": {k: dict(v) for k, v in counters.items() if k in ("frames", "stats", "recompiles")}}
    dc.recompile_limit = dc.cache_size_limit = default
    rows = {k: {(m["name"], m["mode"]): m for m in r["modules"]} for k, r in runs.items()}
    d, c = rows["default"], rows["always_compiled"]
    moved = sorted(((k, d[k].get("rel_l2"), c[k].get("rel_l2")) for k in d.keys() & c.keys()
                    if d[k].get("rel_l2") != c[k].get("rel_l2")), key=lambda x: -abs((x[2] or 0) - (x[1] or 0)))
    verdict = [k for k in d.keys() & c.keys() if d[k].get("passed") != c[k].get("passed")]
    out = {"case": a.case, "system": "megatron-bridge", "device": "cpu", "runs": limits, "env": env_info("cpu"),
           "rows": len(d), "rows_moved": len(moved),
           "largest_moves": [{"name": k[0], "mode": k[1], "default": x, "always_compiled": y} for k, x, y in moved[:15]],
           "verdicts_changed": [{"name": k[0], "mode": k[1], "default": d[k]["passed"], "always_compiled": c[k]["passed"]}
                                for k in verdict],
           "passed": {k: r["passed"] for k, r in runs.items()},
           "first_divergence": {k: r["summary"]["first_divergence"] for k, r in runs.items()},
           "n_failed": {k: r["summary"]["n_failed"] for k, r in runs.items()}}
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
