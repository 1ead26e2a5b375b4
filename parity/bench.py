"""``python -m parity bench``: time each phase of a parity run and its peak memory, and keep the numbers.

Phases come from the engine (build, HF forward + capture, noise floor, conversion, round trip, Megatron
forward + on-the-fly comparison, isolated replay, metrics) plus report rendering; plain forward times
(no hooks) are measured by the engine for both models. The record, with machine, card and versions,
is written to ``bench/<case>-<device>-<dtype>.json`` so later changes can be compared.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def bench(case, *, device: str, dtype: str | None, out_dir: Path, progress: bool = False) -> Path:
    from parity.cli import execute
    from parity.report.store import atomic_write
    from parity.report.html import render_run

    t0 = time.perf_counter()
    results = execute(case, device=device, dtype=dtype, checkpoint=None, seed=None, progress=progress)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    html = render_run(results, None)
    render_s = time.perf_counter() - t1
    phases = dict(results.get("phases") or {})
    phases["report_render"] = render_s
    timings = results.get("timings") or {}
    conversion = phases.get("hf_state_to_host", 0.0) + phases.get("convert", 0.0)
    forwards = timings.get("hf_forward_s", 0.0) + timings.get("megatron_forward_s", 0.0)
    record = {
        "case": results["case"], "device": results["device"], "dtype": results["dtype"],
        "passed": results["passed"], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "device_name": results["env"].get("device_name")},
        "env": results["env"], "inputs": results.get("inputs"), "parallel": results.get("parallel"),
        "wall_s": wall, "phases_s": phases, "timings": timings, "peak_memory": results.get("peak_memory"),
        "ratios": {
            "megatron_over_hf_forward": (timings["megatron_forward_s"] / timings["hf_forward_s"])
            if timings.get("hf_forward_s") else None,
            "wall_over_forwards_plus_conversion": wall / (forwards + conversion) if forwards + conversion else None,
        },
        "report_bytes": len(html.encode()),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{results['case']}-{results['device']}-{results['dtype']}.json"
    atomic_write(path, json.dumps(record, indent=1, default=str) + "\n")
    return path
