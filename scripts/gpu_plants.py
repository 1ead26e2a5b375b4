"""The planted Megatron-side errors of ``tests/plants.py`` at the 26B-A4B shape, in one run (issue 11, item 8).

The HF side is built, captured and floored once (``parity.engine.pipeline.reference``) and every plant runs
only the system against that one reference (``pipeline.against``). The case's inputs become a left-padded batch of mixed lengths with offset
positions, so padding and position plants can show. Writes the detection table (plant -> caught? -> module,
mode, value, gate) with machine and versions as JSON.

    python scripts/gpu_plants.py [--case gemma4-26b-a4b] [--seq-len 2048] [--plants a,b] [--out bench/]
        [--clean-from bench/gpu-plants-....json]   (an earlier table's clean run instead of running it again)

Each row also carries ``probing``: the probing rows' cost and share of the run, what each family's seeded search
found, and at the plant's module the failing probing row furthest past its gate (``at_expected.times_gate``, e.g.
the post-attention norm eps plant at input RMS 1e-3) beside the same module's isolated rows
(``isolated_times_gate``) -- the issue-22 sensitivity figures:

    python scripts/gpu_plants.py --plants post_attention_norm_eps,rope_positions_bf16,rope_angles_bf16,\
        sliding_window_off_by_one --tag probing --out bench/

``--sensitivity`` measures instead, per module class of ``tests/plants.py`` ``SENSITIVITY`` (a norm weight, a
projection, routing weights, an expert output; all in layer 0), the smallest planted relative error caught and
localised: the ``--eps`` list is descended and each class stops at its first eps not caught (breadth first over
the classes; ``--max-runs`` / ``--max-wall`` bound the sweep). Writes
``detection-sensitivity-<case>-<device>.json`` (rewritten after every point, so a cut run leaves its points):

    python scripts/gpu_plants.py --sensitivity [--eps 1e-2,1e-3,1e-4,1e-5,1e-6] [--classes "norm weight,projection"]
        [--max-runs 12] [--max-wall 400] [--case-inputs] [--case gemma4-text-tiny-padded --device cpu]

A train case's backward plants on an 80 GB card: ``--grad-layers 28,29`` (``train.grad_layers``: only those layers'
parameters get gradients, on both sides; a plant whose row is another parameter's gradient is not run, and says so).
The backward plants sit in the last layer or in every layer, so the rows they are first seen at are the last layer's
(``{last}`` in tests/plants.py: 5 in the tiny cases, 29 at 26B-A4B). ``--grad-embedding`` trains the tied embedding
too (``train.grad_embedding``), for the tied head's plant.

Memory: the HF model stays resident beside the Megatron model (47 + 47 GiB in bf16 at the 26B shape): an H200
(139 GiB) holds both. On an 80 GB card ``--sequential`` keeps the case's own sequential run instead (HF captured and
floored once, then released, its weights kept on the host; each plant builds and loads the system from them). On CPU (tiny cases) it is the same flow, a smoke test of the script itself.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def row(plant, shape, r: dict, wall: float, known: set | None = None, clean_rows: dict | None = None) -> dict:
    """One plant's outcome. ``known``: the rows failing in the clean run; when there are any, the plant is
    judged by its first *new* divergence (``first_new``) instead of the run's first divergence. ``clean_rows``: the
    clean run's rows by (name, mode), for ``nearest``."""
    s = r["summary"]
    d = s.get("first_divergence_detail") or {}
    where = plant.expected(shape) if plant is not None else None
    out = {"plant": plant.name if plant else "clean", "kind": plant.kind if plant else None, "expected": where,
           "passed": r["passed"], "caught": None, "first_divergence": s["first_divergence"],
           "megatron_name": d.get("megatron_name"), "mode": d.get("mode"), "metric": d.get("metric"),
           "value": d.get("value"), "gate": d.get("gate"), "why": d.get("why"), "n_failed": s["n_failed"],
           "logits_rel_l2": s["logits"].get("rel_l2"), "logits_kl_max": s["logits"].get("kl_max"),
           "decisive_share": s["logits"].get("decisive_share"), "wall_s": wall}
    out["probing"] = probing(r, where)
    if plant is None:
        return out
    judged = d
    if known:
        from tests.plants import first_new

        judged = first_new(r, known)
        out["first_new_divergence"] = {k: judged.get(k) for k in ("name", "megatron_name", "mode", "metric",
                                                                   "value", "gate")}
    # a backward plant's first divergence is the earlier of its module's end to end and alone (tests/test_backward.py)
    out["caught"] = (not r["passed"]) and plant.localised_at(judged.get("name"), shape) and (
        plant.megatron_name is None or judged.get("megatron_name") == plant.megatron_name)
    out["nearest"] = nearest(r, plant, shape, clean_rows)
    return out


def nearest(r: dict, plant, shape, clean_rows: dict | None, n: int = 3) -> list:
    """The ``n`` rows at the plant's own modules (where it is caught, ``Plant.localised_at``) nearest their gates in
    the planted run, each with how many times its gate it is there and in the clean run: how far a plant moved the
    rows it should fail (a plant that is missed says by how much)."""
    rows = [m for m in r["modules"] if m.get("gate") and times_gate(m) is not None
            and plant.localised_at(m["name"], shape)]
    out = []
    for m in sorted(rows, key=times_gate, reverse=True)[:n]:
        before = (clean_rows or {}).get((m["name"], m["mode"]))
        out.append({"name": m["name"], "mode": m["mode"], "metric": m["gate"]["metric"],
                    "value": m.get(m["gate"]["metric"]), "gate": m["gate"]["max"],
                    "truth_rel_l2": m.get("truth_rel_l2"), "times_gate": times_gate(m),
                    "clean_times_gate": None if before is None else times_gate(before)})
    return out


def times_gate(m: dict) -> float | None:
    """How far a row is past its gate: its gated value over the gate (and in bf16 its truth over the truth gate)."""
    g = m.get("gate") or {}
    value = m.get(g.get("metric"))
    if value is None or not g.get("max"):
        return None
    out = value / g["max"]
    if m.get("truth_gate") and m.get("truth_rel_l2") is not None:
        out = max(out, m["truth_rel_l2"] / m["truth_gate"]["max"])
    return out


def probing(r: dict, where: str | None) -> dict:
    """The probing rows of a run (issue 22): their cost, what each family's search found, and at the plant's module
    the failing probing row furthest past its gate (the sensitivity figure: how many times its gate)."""
    pr = r.get("probing") or {}
    out = {"seconds": pr.get("seconds"), "share_of_run": pr.get("share_of_run"),
           "found": {f: (d.get("search") or {}).get("found") for f, d in (pr.get("families") or {}).items()
                     if (d.get("search") or {}).get("found")},
           "failing_rows": sum(1 for m in r["modules"] if m["mode"] == "probing" and not m["passed"])}
    rows = [m for m in r["modules"] if m["mode"] == "probing" and not m["passed"] and m["name"] == where]
    if rows:
        worst = max(rows, key=lambda m: times_gate(m) or 0.0)
        out["at_expected"] = {"probe": worst.get("probe"), "kind": worst.get("kind"),
                              "metric": worst["gate"]["metric"], "value": worst.get(worst["gate"]["metric"]),
                              "gate": worst["gate"]["max"], "truth_rel_l2": worst.get("truth_rel_l2"),
                              "times_gate": times_gate(worst)}
    iso = [m for m in r["modules"] if m["mode"] == "isolated" and m["name"] == where and m.get("gate")]
    if iso:  # the same module on the run's own inputs, for comparison
        out["isolated_times_gate"] = max(times_gate(m) or 0.0 for m in iso)
    return out


def truth_ratios(r: dict) -> dict:
    """Clean-run distribution of err(Megatron vs HF-fp32) / err(HF-bf16 vs HF-fp32) over the isolated rows."""
    ratios = sorted(m["truth_ratio"] for m in r["modules"] if m.get("truth_ratio") is not None)
    if not ratios:
        return {}
    q = lambda p: ratios[min(len(ratios) - 1, int(p * (len(ratios) - 1)))]  # noqa: E731
    worst = max((m for m in r["modules"] if m.get("truth_ratio") is not None), key=lambda m: m["truth_ratio"])
    return {"n": len(ratios), "min": ratios[0], "median": q(0.5), "p95": q(0.95), "max": ratios[-1],
            "worst": {k: worst.get(k) for k in ("name", "kind", "truth_rel_l2", "floor", "truth_ratio")}}


OUTCOMES = ("caught", "misplaced", "missed", "unrepresentable", "error", "not run")
SENSITIVITY_EPS = "1e-2,1e-3,1e-4,1e-5,1e-6"


def outcome(point: dict) -> str:
    """caught: FAIL with the planted module as first divergence; misplaced: a module fails, but another one first;
    missed: no module row fails (a weight plant may still fail the weight round trip, which is no localisation)."""
    if point.get("caught"):
        return "caught"
    first = (point["first_new_divergence"].get("name") if "first_new_divergence" in point
             else point.get("first_divergence"))
    return "misplaced" if first else "missed"


def run_plant(plant, ref, a, shape) -> tuple[dict | None, float, BaseException | None]:
    """One run of the system against reference ``ref`` with ``plant`` in place (undone after): (results or None,
    wall seconds, the error the run raised, if any — a plant that breaks the run is a finding, not the end of
    the table)."""
    import pytest

    from parity.engine import pipeline

    mp = pytest.MonkeyPatch()
    t0 = time.perf_counter()
    try:
        plant.plant(mp, shape)
        return pipeline.against(ref, a.system), time.perf_counter() - t0, None
    except Exception as e:  # noqa: BLE001
        return None, time.perf_counter() - t0, e
    finally:
        mp.undo()
        gc.collect()  # a run that raised leaves its model in the traceback's frames until collected
        if a.device == "cuda":
            torch.cuda.empty_cache()


def left_on_device(before: int) -> dict:
    """What a plant's run left allocated on the device (its system should be gone): GiB more than before it, and
    the largest CUDA tensors still alive with the types of what refers to them (a run that leaked its model made the
    next plant's build run out of memory at 26B)."""
    big = sorted((t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.is_cuda),
                 key=lambda t: t.untyped_storage().nbytes(), reverse=True)[:5]
    return {"gib": (torch.cuda.memory_allocated() - before) / 2**30,
            "largest": [{"shape": list(t.shape), "dtype": str(t.dtype), "gib": t.untyped_storage().nbytes() / 2**30,
                         "held_by": sorted({type(r).__name__ for r in gc.get_referrers(t)} - {"list"})} for t in big]}


def sensitivity(ref, a, shape, out_path: str, table: dict, known: set) -> dict:
    """Per class, the planted relative error descends the ``--eps`` list (breadth first over the classes, so a cut
    by ``--max-runs`` / ``--max-wall`` still leaves every class some points) and stops at the class's first eps that
    is not caught; the table is rewritten after every point."""
    from tests.plants import SENSITIVITY, Unrepresentable, sensitivity_plant

    eps_list = [float(e) for e in a.eps.split(",")]
    classes = [c.strip() for c in a.classes.split(",")] if a.classes else list(SENSITIVITY)
    results = {c: {"expected": SENSITIVITY[c][0], "points": [], "smallest_caught": None, "stopped_at": None}
               for c in classes}
    table.update(eps_tried=eps_list, classes=classes, max_runs=a.max_runs, max_wall_s=a.max_wall,
                 results=results, smallest_caught={c: None for c in classes}, runs=0)
    t_start, active = time.perf_counter(), list(classes)
    for eps in eps_list:
        for cls in list(active):
            plant = sensitivity_plant(cls, eps)
            over = (a.max_runs is not None and table["runs"] >= a.max_runs) or \
                   (a.max_wall is not None and time.perf_counter() - t_start > a.max_wall)
            if over:
                point = {"eps": eps, "outcome": "not run", "why": "budget (--max-runs / --max-wall) spent"}
            else:
                res, wall, err = run_plant(plant, ref, a, shape)
                if isinstance(err, Unrepresentable):  # nothing would be planted: no run
                    point = {"eps": eps, "outcome": "unrepresentable", "why": str(err), "wall_s": wall}
                elif err is not None:
                    table["runs"] += 1
                    point = {"eps": eps, "outcome": "error", "error": f"{type(err).__name__}: {err}", "wall_s": wall}
                else:
                    table["runs"] += 1
                    point = {"eps": eps, **row(plant, shape, res, wall, known),
                             "roundtrip_bit_exact": res["roundtrip"]["bit_exact"] == res["roundtrip"]["tensors"]}
                    point["outcome"] = outcome(point)
                point["planted"] = dict(plant.info)
            for k in ("plant", "kind", "expected", "caught", "logits_kl_max", "decisive_share"):
                point.pop(k, None)
            res_c = results[cls]
            res_c["points"].append(point)
            if point["outcome"] == "caught":
                res_c["smallest_caught"] = table["smallest_caught"][cls] = eps
            else:
                res_c["stopped_at"] = {"eps": eps, "outcome": point["outcome"]}
                active.remove(cls)
            print(json.dumps({"class": cls, **point}, default=str), flush=True)
            table["wall_s"] = time.perf_counter() - t_start
            with open(out_path, "w") as f:
                json.dump(table, f, indent=1, default=str)
        if not active:
            break
    return table


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="gemma4-26b-a4b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="per sequence; two sequences (default: 2048 at the full shape, keeping 4,096 tokens; else "
                         "the case's own seq_len)")
    ap.add_argument("--case-inputs", action="store_true",
                    help="keep the case's own inputs (e.g. the padded tiny cases) instead of the 2-sequence batch")
    ap.add_argument("--plants", help="comma-separated plant names (default: all)")
    ap.add_argument("--sensitivity", action="store_true",
                    help="instead of the plant table: the smallest planted relative error caught, per class")
    ap.add_argument("--eps", default=SENSITIVITY_EPS, help="--sensitivity: the relative errors, tried in this order")
    ap.add_argument("--classes", help="--sensitivity: comma-separated classes (default: all of tests/plants.py "
                                      "SENSITIVITY)")
    ap.add_argument("--max-runs", type=int, default=None, help="--sensitivity: at most this many plant runs")
    ap.add_argument("--max-wall", type=float, default=None,
                    help="--sensitivity: start no plant run after this many seconds of the sweep")
    ap.add_argument("--system", default="parity", choices=("parity", "megatron-bridge"),
                    help="system under test; megatron-bridge runs tests/plants.py BRIDGE_PLANTS by default")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench"))
    ap.add_argument("--tag", default="", help="appended to the record's file name (e.g. probing)")
    ap.add_argument("--clean-from", metavar="TABLE",
                    help="a plant table this script wrote for the same case, inputs, system and device: its clean run "
                         "(verdict and failing rows) stands for this one's, which is not run again (at the 26B train "
                         "shape a clean run costs as much as a plant)")
    ap.add_argument("--grad-layers", metavar="I,J",
                    help="train cases: only these text decoder layers' parameters get gradients, on both sides "
                         "(train.grad_layers; the 26B shape on an 80 GB card: --grad-layers 28,29, the last two layers, "
                         "where the backward plants are first seen). A plant whose row is a parameter outside them is "
                         "not run, and its row says why")
    ap.add_argument("--grad-embedding", action="store_true",
                    help="with --grad-layers: the word embedding (and the head tied to it) gets its gradient too "
                         "(train.grad_embedding: the tied head's plant runs; 1.4 GiB more a side at 26B)")
    ap.add_argument("--sequential", action="store_true",
                    help="forward plants: keep the case's sequential run (fits an 80 GB card) instead of HF resident")
    a = ap.parse_args()

    from parity.cases import load_case
    from parity.engine import pipeline
    from parity.engine.launch import cpu_threads
    from parity.engine.pipeline import env_info
    from tests.plants import BACKWARD_PLANTS, BRIDGE_PLANTS, BY_NAME, PLANTS, SENSITIVITY, Shape, failing

    if a.sensitivity:
        for e in a.eps.split(","):
            try:
                float(e)
            except ValueError:
                print(f"gpu_plants: --eps: not a number: {e!r}", file=sys.stderr)
                return 2
        unknown = [c for c in (a.classes.split(",") if a.classes else []) if c.strip() not in SENSITIVITY]
        if unknown:
            print(f"gpu_plants: --classes: unknown {unknown[0]!r} (known: {', '.join(SENSITIVITY)})", file=sys.stderr)
            return 2
    base = load_case(a.case)
    train = base.train is not None  # a train case: its backward plants, HF's side sequential as the case runs it
    # (at 26B HF's model, the system's and its gradients do not fit one H200 together); the reference's gradients
    # are kept for every plant (``Reference.final`` stays False)
    resident = not (train or a.sequential)  # HF's model kept on the device beside the system's, else released
    run = {"sequential": False, "offload": base.run.offload} if resident else dataclasses.asdict(base.run)
    if a.case_inputs:
        case = base.replace(run=run)
    else:
        full = base.model.builder == "full_text"
        n = a.seq_len or (base.inputs.seq_len // 2 if train else 2048 if full else base.inputs.seq_len)
        case = base.replace(inputs={"batch": 2, "seq_len": n, "pad_tail": 0, "padding": "left",
                                    "lengths": [n, (3 * n) // 4 + 1], "position_offset": 5}, run=run)
    if a.grad_layers and not train:
        print("gpu_plants: --grad-layers: only for train cases", file=sys.stderr)
        return 2
    if a.grad_embedding and not a.grad_layers:
        print("gpu_plants: --grad-embedding: only with --grad-layers", file=sys.stderr)
        return 2
    try:
        grad_layers = sorted({int(i) for i in a.grad_layers.split(",")}) if a.grad_layers else None
    except ValueError:
        print(f"gpu_plants: --grad-layers: expected layer indices like 5 or 0,5, got {a.grad_layers!r}", file=sys.stderr)
        return 2
    if train and (case.train.steps or grad_layers):  # backward-only plants: the backward modes localise them
        # (at 26B HF's trajectories cost ~50 s once and the system's ~20 s a plant; the step's plants run on the tiny
        # cases, tests/test_backward.py)
        from parity.cases import parse_case

        data = case.to_dict()
        data["train"] = {k: v for k, v in data["train"].items() if k not in ("step_layers", "step_layers_why")}
        data["train"].update(steps=0, no_step="backward-only plants (scripts/gpu_plants.py): the step is not planted")
        if grad_layers:
            data["train"].update(grad_layers=grad_layers, grad_layers_why="scripts/gpu_plants.py --grad-layers: HF's "
                                 "and the system's gradients of every parameter (47 GiB each at 26B) do not fit an "
                                 "80 GB card beside the weights", **({"grad_embedding": True} if a.grad_embedding
                                                                      else {}))
        case = parse_case(data, source=a.case, stem=case.name, path=case.path)
    shape = Shape.of(case)
    same = {"case": a.case, "inputs": case.to_dict()["inputs"], **({"train": case.to_dict()["train"]} if train else {}),
            "dtype": case.dtype, "device": a.device}
    earlier = None
    if a.clean_from:
        try:
            with open(a.clean_from) as f:
                earlier = json.load(f)
        except (OSError, ValueError) as e:
            print(f"gpu_plants: --clean-from: cannot read {a.clean_from}: {e}", file=sys.stderr)
            return 2
        differs = [k for k, v in same.items() if json.loads(json.dumps(earlier.get(k), default=str)) !=
                   json.loads(json.dumps(v, default=str))]
        if (earlier.get("system") or {}).get("name") != a.system:
            differs.append("system")
        if differs or "clean" not in earlier:
            print(f"gpu_plants: --clean-from: {a.clean_from} is not this run's clean run (differs in "
                  f"{', '.join(differs) or 'no clean row'})", file=sys.stderr)
            return 2
    with cpu_threads(a.device) if a.sensitivity else contextlib.nullcontext():  # CPU: one thread, as the tests
        t0 = time.perf_counter()
        ref = pipeline.reference(case, device=a.device, progress=True)  # HF once (resident, or its weights on the host)
        if earlier is None:
            r = pipeline.against(ref, a.system)
            clean = row(None, shape, r, time.perf_counter() - t0)
            clean["truth_ratios"] = truth_ratios(r)
            clean["phases"] = r.get("phases")
            clean_rows = {(m["name"], m["mode"]): m for m in r["modules"]}
            known = failing(r)  # a clean run that fails (a system's findings): plants are judged by new divergences
            clean["failing_rows"] = sorted(f"{n} [{m}]" for n, m in known)
            system = r.get("system")
        else:  # the earlier table's clean run, named as such
            clean = {**earlier["clean"], "from": {"table": os.path.basename(a.clean_from),
                                                  "created": earlier.get("created")}}
            known = {(name, mode[:-1]) for name, mode in (x.rsplit(" [", 1) for x in clean["failing_rows"])}
            clean_rows = None  # its rows were not kept: ``nearest`` has no clean figures
            system = earlier.get("system")
        print(json.dumps(clean, default=str), flush=True)
        os.makedirs(a.out, exist_ok=True)
        head = {**same, "system": system, "env": env_info(a.device), "machine": platform.node(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if a.sensitivity:
            path = os.path.join(a.out, f"detection-sensitivity-{a.case}-{a.device}.json")
            table = {"what": "the smallest planted relative error caught and localised (FAIL with the planted "
                             "module as first_divergence), per module class, layer 0 only (issue 11 item 8)",
                     "how": "norm weight / projection: the converted Megatron tensor with a relative error eps "
                            "(rel-L2) as realised in its dtype (tests/plants.py perturbed: dense x (1 + eps N(0,1)), "
                            "seeded; below what the dtype carries densely, one-ulp moves of a seeded random subset; "
                            "'unrepresentable' where even one ulp of one element exceeds 2 eps); routing weights "
                            "(top-k weights of layer 0's router) and expert output (layer 0's prob-weighted expert "
                            "outputs) x (1 + eps) at runtime. Per class the eps list is descended and the sweep stops "
                            "at the first eps not caught",
                     "outcomes": {"caught": "FAIL, first_divergence = the planted module",
                                  "misplaced": "FAIL, but another module diverges first",
                                  "missed": "no module row fails (a weight plant may still fail the bit-exact weight "
                                            "round trip, which localises nothing)",
                                  "unrepresentable": "the dtype cannot carry this error in this tensor: not run",
                                  "not run": "--max-runs / --max-wall spent"},
                     **head, "clean": clean}
            sensitivity(ref, a, shape, path, table, known)
            with open(path, "w") as f:
                json.dump(table, f, indent=1, default=str)
            print(f"[gpu_plants] sensitivity, smallest caught: {json.dumps(table['smallest_caught'])}; "
                  f"{table['runs']} plant runs; clean run {'PASS' if clean['passed'] else 'FAIL'}; wrote {path}",
                  flush=True)
            return 0 if clean["passed"] and all(v is not None for v in table["smallest_caught"].values()) else 1
        plants = [BY_NAME[p] for p in a.plants.split(",")] if a.plants else (
            [p for p in BACKWARD_PLANTS if case.dtype not in p.misses] if train and a.system == "parity"
            else PLANTS if a.system == "parity" else BRIDGE_PLANTS)
        tag = "" if a.system == "parity" else f"-{a.system}"
        path = os.path.join(a.out, f"gpu-plants-{a.case}{tag}-{a.device}{'-' + a.tag if a.tag else ''}.json")
        rows: list = []
        params, embedding = dict(ref.model.named_parameters()), ref.model.get_input_embeddings().weight
        for plant in [None, *plants]:  # the table written before the first plant and after each (a call cut short
            frozen = None if plant is None else _frozen_row(plant.expected(shape), params, embedding, a)
            if frozen is not None:
                rows.append({"plant": plant.name, "kind": plant.kind, "expected": plant.expected(shape),
                             "caught": None, "not_run": frozen})
                print(json.dumps(rows[-1], default=str), flush=True)
            elif plant is not None:     # by its time limit keeps what ran)
                before = torch.cuda.memory_allocated() if a.device == "cuda" else 0
                res, wall, err = run_plant(plant, ref, a, shape)
                out = (row(plant, shape, res, wall, known, clean_rows) if err is None else
                       {"plant": plant.name, "kind": plant.kind, "caught": False,
                        "error": f"{type(err).__name__}: {err}"})
                res = err = None
                if a.device == "cuda" and torch.cuda.memory_allocated() - before > 2**30:
                    out["left_on_device"] = left_on_device(before)  # the next plant's build would run out
                rows.append(out)
                print(json.dumps(out, default=str), flush=True)
            table = {**head, "clean": clean, "plants": rows, "caught": sum(1 for x in rows if x.get("caught")),
                     "n_plants": sum(1 for x in rows if "not_run" not in x), "of": len(plants),
                     "not_run": sum(1 for x in rows if "not_run" in x)}
            with open(path, "w") as f:
                json.dump(table, f, indent=1, default=str)
    skipped = f" ({table['not_run']} not run)" if table["not_run"] else ""
    print(f"[gpu_plants] {table['caught']}/{table['n_plants']} plants caught and localised{skipped}; clean run "
          f"{'PASS' if clean['passed'] else 'FAIL'}; wrote {path}", flush=True)
    return 0 if clean["passed"] and table["caught"] == table["n_plants"] else 1


def _frozen_row(expected: str | None, params: dict, embedding, a) -> str | None:
    """Why a plant is not run under ``--grad-layers``: the row it is caught at is a parameter of HF's that gets no
    gradient (frozen at its build; None: it runs). ``embedding``: HF's word embedding weight (``--grad-embedding``
    would train it)."""
    if expected not in params or params[expected].requires_grad:
        return None
    hint = " (without --grad-embedding)" if params[expected] is embedding else ""
    return f"its row, {expected}'s gradient, is not computed: --grad-layers {a.grad_layers}{hint}"


if __name__ == "__main__":
    sys.exit(main())
