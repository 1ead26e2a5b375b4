"""Run parity cases on a GPU machine in one call and write compact summaries (used by gpu_check.sh)."""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
import traceback

import torch


def summary(r: dict) -> dict:
    keep = ("case", "system", "passed", "device", "dtype", "checks", "phases", "timings", "peak_memory", "roundtrip", "inputs",
            "parallel", "env", "hf_released_before_megatron", "host_staged_gib")
    out = {k: r.get(k) for k in keep}
    out["roundtrip"] = {k: v for k, v in (r.get("roundtrip") or {}).items() if k != "rows"}
    s = r.get("summary", {})
    out["first_divergence"] = s.get("first_divergence")
    out["first_divergence_detail"] = s.get("first_divergence_detail")
    out["worst_layer"] = s.get("worst_layer")
    out["logits"] = {k: v for k, v in (s.get("logits") or {}).items() if k != "worst_positions"}
    fails = [m for m in r.get("modules", []) if not m.get("passed")]
    out["n_modules"], out["n_failed"] = len(r.get("modules", [])), len(fails)
    out["failed_by_mode"] = dict(collections.Counter(m.get("mode") for m in fails))  # the list below stops at 60
    keys = ("name", "mode", "rel_l2", "floor", "truth_rel_l2", "gate", "why")
    out["failed"] = [{k: m.get(k) for k in keys} for m in fails[:60]]
    cleared = [m for m in r.get("modules", []) if m.get("unstable") and m.get("passed")]
    out["n_unstable_cleared"] = len(cleared)
    out["unstable_cleared"] = [{k: m.get(k) for k in keys} for m in cleared[:60]]
    return out


def removed(causes: str | None):
    """Megatron-Bridge's named defaults switched off for the run (a diagnostic: which of its findings move a
    verdict), or nothing."""
    if not causes:
        return contextlib.nullcontext()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.test_megatron_bridge_backward import causes_removed

    return causes_removed(*causes.split(","))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--dtype")
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--checkpoint", help="local HF folder for the cases (the real-checkpoint path)")
    ap.add_argument("--full", action="store_true", help="also write the full results.json of each case")
    ap.add_argument("--without", metavar="CAUSES",
                    help="diagnostic: Megatron-Bridge built with these defaults of its switched off, comma-separated "
                         "(tests/test_megatron_bridge_backward.py causes_removed: fused_cross_entropy, aux_loss, "
                         "post_norm_eps, embed_scale, experts_probs); the summaries are named ...-without")
    ap.add_argument("--lora-targets", metavar="T,U",
                    help="LoRA cases: these peft targets instead of the case's (e.g. without o_proj: finding 13)")
    ap.add_argument("--system", default="parity",
                    help="system(s) under test, comma-separated: several run against one HF reference (one summary "
                         "each, plus <case>-<a>__<b>.json with the shared run's wall and the reference's phases)")
    a = ap.parse_args()
    from parity.cases import checkpoint_for, load_case
    from parity.engine.launch import execute_systems  # routes tp*ep > 1 cases through torchrun

    os.makedirs(a.out, exist_ok=True)
    rc = 0
    systems = a.system.split(",")
    for name in a.cases:
        t0 = time.perf_counter()
        try:
            case = load_case(name)
            if a.seq_len:
                case = case.replace(inputs={"seq_len": a.seq_len})
            if a.lora_targets:
                case = case.replace(lora={"targets": a.lora_targets.split(",")})
            with removed(a.without):
                runs = execute_systems(case, device="cuda", dtype=a.dtype,
                                       checkpoint=checkpoint_for(case, a.checkpoint), seed=None, progress=True,
                                       systems=systems)
            wall = time.perf_counter() - t0
            for system, r in zip(systems, runs):
                s = summary(r)
                s["wall_s"] = wall
                print(json.dumps(s, indent=1, default=str), flush=True)
                tag = name + ("-checkpoint" if a.checkpoint else "") + ("" if system == "parity" else f"-{system}")
                tag += "-shared" if len(systems) > 1 else ""
                tag += "-without" if a.without or a.lora_targets else ""
                with open(os.path.join(a.out, f"{tag}.json"), "w") as f:
                    json.dump(s, f, indent=1, default=str)
                if a.full:
                    with open(os.path.join(a.out, f"{tag}.results.json"), "w") as f:
                        json.dump(r, f, default=str)
                rc |= 0 if r["passed"] else 1
            if len(systems) > 1:
                from parity.bench import several

                with open(os.path.join(a.out, f"{name}-{'__'.join(systems)}.json"), "w") as f:
                    json.dump(several(runs, wall), f, indent=1, default=str)
        except Exception:
            traceback.print_exc()
            rc |= 4
        torch.cuda.empty_cache()
    return rc


if __name__ == "__main__":
    sys.exit(main())
