"""``python -m parity bench``: time each phase of a parity run and its peak memory, and keep the numbers.

Phases come from the engine (build, HF forward + capture, noise floor, conversion, round trip, Megatron
forward + on-the-fly comparison, isolated replay, metrics) plus report rendering; plain forward times
(no hooks) are measured by the engine for both models. The record, with machine, card and versions,
is written to ``bench/<case>-<device>-<dtype>.json`` so later changes can be compared. With several systems
(``--system a,b``: one HF reference for all) the record is ``...-systems-a__b.json``: the wall of the whole run,
the reference's phases (measured once) and each system's own phases.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


# issue 23's speed targets, the whole run's wall on one H200 by system under test (the same phases and rows)
WALL_TARGETS_S = {"gemma4-26b-a4b": {"parity": 30.0, "megatron-bridge": 45.0}}


def _wall_limit(case: str | None, system: str, device: str | None) -> float | None:
    """Issue 23's wall target for a run of ``case`` with ``system`` on ``device`` (CUDA only), or None."""
    return WALL_TARGETS_S.get(case, {}).get(system) if device == "cuda" else None


def _met(out: dict) -> dict:
    for v in out.values():
        v["met"] = v["value"] <= v["limit"]
    return out


def targets(record: dict) -> dict:
    """The GPU-scale issue's acceptance figures for this record: each ``{"value", "limit", "met"}``.

    ``capture_plus_metrics_over_forwards``: what hooks, captured copies (incl. moving them to the host) and
    the end-to-end comparison add to the two plain forwards: (HF forward with capture - plain HF forward)
    + (Megatron forward with on-the-fly comparison - plain Megatron forward) + metrics, over the two plain
    forwards. ``wall_over_...``: the whole run over HF forward + Megatron forward + conversion (host
    hand-over + bridge)."""
    ph, tm = record["phases_s"], record["timings"]
    hf, mc = tm.get("hf_forward_s") or 0.0, tm.get("megatron_forward_s") or 0.0
    out = {}
    if hf and mc:
        extra = (ph.get("hf_forward", 0.0) - hf) + (ph.get("megatron_forward", 0.0) - mc) + ph.get("metrics", 0.0)
        out["capture_plus_metrics_over_forwards"] = {"value": extra / (hf + mc), "limit": 0.25}
        out["megatron_over_hf_forward"] = {"value": mc / hf, "limit": 1.5}
    ratio = record["ratios"].get("wall_over_forwards_plus_conversion")
    if ratio is not None:
        out["wall_over_forwards_plus_conversion"] = {"value": ratio, "limit": 3.0}
    if ph.get("probing") is not None and record.get("wall_s"):  # the probing rows: part of every run while cheap
        out["probing_share_of_run"] = {"value": ph["probing"] / record["wall_s"], "limit": 0.15}
    peak = (record.get("peak_memory") or {}).get("gpu_peak_gib")
    if peak is not None:
        out["gpu_peak_gib"] = {"value": peak, "limit": 75.0}
    limit = _wall_limit(record.get("case"), (record.get("system") or {}).get("name", "parity"), record.get("device"))
    if limit is not None:
        out["wall_s"] = {"value": record["wall_s"], "limit": limit}
    return _met(out)


def bench(case, *, device: str, dtype: str | None, out_dir: Path, progress: bool = False,
          system: str = "parity", systems: list[str] | None = None, repeat: int = 1) -> Path:
    """Time ``case`` (``repeat`` times in this process: the record is the last run's, ``walls_s`` lists each)."""
    from parity.cases import checkpoint_for
    from parity.engine.launch import execute_systems
    from parity.report.store import atomic_write

    systems = systems or [system]
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        runs = execute_systems(case, device=device, dtype=dtype, checkpoint=checkpoint_for(case, None), seed=None,
                               progress=progress, systems=systems)
        walls.append(time.perf_counter() - t0)
    if len(runs) > 1:
        record = several(runs, walls[-1])
        record["walls_s"] = walls
        out_dir.mkdir(parents=True, exist_ok=True)
        r = runs[0]
        path = out_dir / f"{r['case']}-{r['device']}-{r['dtype']}-systems-{'__'.join(systems)}.json"
        atomic_write(path, json.dumps(record, indent=1, default=str) + "\n")
        return path
    return single(runs[0], walls, out_dir, system=systems[0])


def several(runs: list[dict], wall: float) -> dict:
    """Several systems against one reference: the reference's phases (the same measurement in every system's
    results: built and timed once) and each system's own."""
    phases = [dict(r.get("phases") or {}) for r in runs]
    shared = {k: v for k, v in phases[0].items() if all(p.get(k) == v for p in phases[1:])}
    r = runs[0]
    per_system = {x["system"]["name"]: {"passed": x["passed"], "n_failed": x["summary"]["n_failed"],
                                        "phases_s": {k: v for k, v in p.items() if k not in shared},
                                        "system_s": sum(v for k, v in p.items() if k not in shared),
                                        "probing_families_s": probing_families(x),
                                        "phase_parts_s": x.get("phase_parts") or {},
                                        "timings": x.get("timings"), "peak_memory": x.get("peak_memory")}
                  for x, p in zip(runs, phases)}
    reference_s, goals = sum(shared.values()), {}
    for name, s in per_system.items():  # a system's run alone: the reference's phases and its own
        s["run_s"] = reference_s + s["system_s"]
        limit = _wall_limit(r["case"], name, r["device"])
        if limit is not None:
            goals[f"{name}_phases_s"] = {"value": s["run_s"], "limit": limit}
        if s["phases_s"].get("probing") is not None:
            goals[f"{name}_probing_share"] = {"value": s["phases_s"]["probing"] / s["run_s"], "limit": 0.15}
    return {"case": r["case"], "device": r["device"], "dtype": r["dtype"], "systems": [x["system"] for x in runs],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"host": platform.node(), "cpu_count": os.cpu_count(),
                        "device_name": r["env"].get("device_name")}, "env": r["env"], "inputs": r.get("inputs"),
            "wall_s": wall, "reference_phases_s": shared, "reference_s": reference_s, "per_system": per_system,
            # the phases a run of one system spends (not its imports and start: those are the single record's
            # wall_s), against issue 23's wall targets; probing's share of them against issue 22's 15 %
            "targets": _met(goals)}


def probing_families(results: dict) -> dict:
    """Seconds of each probing family in a run (where the probing phase's time went), {} without probing."""
    families = (results.get("probing") or {}).get("families") or {}
    return {name: round(f.get("seconds", 0.0), 3) for name, f in families.items()}


def single(results: dict, walls: list[float], out_dir: Path, system: str) -> Path:
    """One system's record: ``walls`` each run's wall (the record is the last run's)."""
    from parity.report.html import render_run
    from parity.report.store import atomic_write

    wall = walls[-1]
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
        "passed": results["passed"], "system": results.get("system"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "device_name": results["env"].get("device_name")},
        "env": results["env"], "inputs": results.get("inputs"), "parallel": results.get("parallel"),
        "wall_s": wall, "walls_s": list(walls), "phases_s": phases, "probing_families_s": probing_families(results),
        "phase_parts_s": results.get("phase_parts") or {},  # where a phase's seconds go (``Progress.part``)
        "timings": timings,
        "peak_memory": results.get("peak_memory"),
        "ratios": {
            "megatron_over_hf_forward": (timings["megatron_forward_s"] / timings["hf_forward_s"])
            if timings.get("hf_forward_s") and timings.get("megatron_forward_s") else None,
            "wall_over_forwards_plus_conversion": wall / (forwards + conversion) if forwards + conversion else None,
        },
        "report_bytes": len(html.encode()),
    }
    record["targets"] = targets(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if system == "parity" else f"-{system}"
    path = out_dir / f"{results['case']}-{results['device']}-{results['dtype']}{suffix}.json"
    atomic_write(path, json.dumps(record, indent=1, default=str) + "\n")
    return path
