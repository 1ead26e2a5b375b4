"""The planted Megatron-side errors of ``tests/plants.py`` at the 26B-A4B shape, in one run (issue 11, item 8).

The HF side is built, captured and floored once: the script keeps the first run's HF model, capture, noise
floors and fp32 reference (``parity.engine.run``'s own functions, memoised for this process) and re-runs only
the Megatron side per plant. The case's inputs become a left-padded batch of mixed lengths with offset
positions, so padding and position plants can show. Writes the detection table (plant -> caught? -> module,
mode, value, gate) with machine and versions as JSON.

    python scripts/gpu_plants.py [--case gemma4-26b-a4b] [--seq-len 2048] [--plants a,b] [--out bench/]

Memory: the HF model stays resident beside the Megatron model (47 + 47 GiB in bf16 at the 26B shape): an H200
(139 GiB) holds both. On CPU (tiny cases) it is the same flow, a smoke test of the script itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def memoise_reference(pipeline, kinds) -> None:
    """Build, capture and floor HF once: later runs of this process reuse the first run's results."""
    cache: dict = {}

    def once(name, fn):
        def wrapped(*a, **kw):
            if name not in cache:
                cache[name] = fn(*a, **kw)
            return cache[name]
        return wrapped

    for name in ("capture_hf", "end_to_end_floors", "isolated_floors"):
        setattr(pipeline, name, once(name, getattr(pipeline, name)))
    for kind in kinds.values():
        kind.build = once(f"build_{kind.name}", kind.build)
    # the weights stay in the (kept) HF model: no host staging, nothing released between plants
    pipeline.weights_for_conversion = lambda model, sequential, stage=None: (
        {k: v.detach() for k, v in model.state_dict().items()}, None)


def row(plant, shape, r: dict, wall: float) -> dict:
    s = r["summary"]
    d = s.get("first_divergence_detail") or {}
    where = plant.expected(shape) if plant is not None else None
    caught = (not r["passed"]) and s["first_divergence"] == where if plant is not None else None
    return {"plant": plant.name if plant else "clean", "kind": plant.kind if plant else None, "expected": where,
            "passed": r["passed"], "caught": caught, "first_divergence": s["first_divergence"],
            "megatron_name": d.get("megatron_name"), "mode": d.get("mode"), "metric": d.get("metric"),
            "value": d.get("value"), "gate": d.get("gate"), "why": d.get("why"), "n_failed": s["n_failed"],
            "logits_rel_l2": s["logits"].get("rel_l2"), "logits_kl_max": s["logits"].get("kl_max"),
            "decisive_share": s["logits"].get("decisive_share"), "wall_s": wall}


def truth_ratios(r: dict) -> dict:
    """Clean-run distribution of err(Megatron vs HF-fp32) / err(HF-bf16 vs HF-fp32) over the isolated rows."""
    ratios = sorted(m["truth_ratio"] for m in r["modules"] if m.get("truth_ratio") is not None)
    if not ratios:
        return {}
    q = lambda p: ratios[min(len(ratios) - 1, int(p * (len(ratios) - 1)))]  # noqa: E731
    worst = max((m for m in r["modules"] if m.get("truth_ratio") is not None), key=lambda m: m["truth_ratio"])
    return {"n": len(ratios), "min": ratios[0], "median": q(0.5), "p95": q(0.95), "max": ratios[-1],
            "worst": {k: worst.get(k) for k in ("name", "kind", "truth_rel_l2", "floor", "truth_ratio")}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="gemma4-26b-a4b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=2048, help="per sequence; two sequences (2048 keeps 4,096 tokens)")
    ap.add_argument("--plants", help="comma-separated plant names (default: all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench"))
    a = ap.parse_args()

    import pytest

    from parity.cases import load_case
    from parity.engine import kinds, pipeline
    from parity.engine.pipeline import env_info
    from tests.plants import BY_NAME, PLANTS, Shape

    base = load_case(a.case)
    n = a.seq_len
    case = base.replace(inputs={"batch": 2, "seq_len": n, "pad_tail": 0, "padding": "left",
                                "lengths": [n, (3 * n) // 4 + 1], "position_offset": 5},
                        run={"sequential": False, "offload": base.run.offload})
    shape = Shape.of(case)
    plants = [BY_NAME[p] for p in a.plants.split(",")] if a.plants else PLANTS
    memoise_reference(pipeline, kinds.KINDS)
    rows = []
    t0 = time.perf_counter()
    r = pipeline.run(case, device=a.device, progress=True)
    clean = row(None, shape, r, time.perf_counter() - t0)
    clean["truth_ratios"] = truth_ratios(r)
    clean["phases"] = r.get("phases")
    print(json.dumps(clean, default=str), flush=True)
    for plant in plants:
        mp = pytest.MonkeyPatch()
        t0 = time.perf_counter()
        try:
            plant.plant(mp, shape)
            res = pipeline.run(case, device=a.device)
            out = row(plant, shape, res, time.perf_counter() - t0)
        except Exception as e:  # a plant that breaks the run is a finding too, not the end of the table
            out = {"plant": plant.name, "kind": plant.kind, "caught": False, "error": f"{type(e).__name__}: {e}"}
        finally:
            mp.undo()
        rows.append(out)
        print(json.dumps(out, default=str), flush=True)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    table = {"case": a.case, "inputs": case.to_dict()["inputs"],
             "dtype": case.dtype, "device": a.device, "env": env_info(a.device), "machine": platform.node(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "clean": clean, "plants": rows,
             "caught": sum(1 for x in rows if x.get("caught")), "n_plants": len(rows)}
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"gpu-plants-{a.case}-{a.device}.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1, default=str)
    print(f"[gpu_plants] {table['caught']}/{len(rows)} plants caught and localised; clean run "
          f"{'PASS' if clean['passed'] else 'FAIL'}; wrote {path}", flush=True)
    return 0 if clean["passed"] and table["caught"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
