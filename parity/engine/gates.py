"""Gates: the numbers come from the case file (``[gates]``), never from constants in code.

- float32: every module's rel-L2 <= ``gates.float32.rel_l2`` (round-off); logits rel-L2 <=
  ``logits_rel_l2`` and per-token KL max <= ``kl_max``.
- bfloat16: rel-L2 <= ``floor_multiplier`` * floor + ``floor_abs``, where the floor is the same module's
  rel-L2 of HF-bf16 against HF-fp32 (same mode); the ratio to the floor is reported. Logits KL max <=
  ``logits_kl_max``.
- exact: rows whose kind is deterministic elementwise (embedding scale, masks) and names listed in
  ``gates.exact`` must match bit for bit (max-abs 0) in any dtype.
- routers, isolated mode: no decisive top-k flip (near-ties are counted and reported, not gated).
"""
from __future__ import annotations

import math

from parity.errors import UserError

_DEFAULTS_REQUIRED = {"float32": ("rel_l2",), "bfloat16": ("floor_multiplier", "floor_abs")}


def _gate_numbers(gates: dict, dtype: str) -> dict:
    g = dict(gates.get(dtype) or {})
    missing = [k for k in _DEFAULTS_REQUIRED.get(dtype, ()) if k not in g]
    if missing:
        raise UserError(f"case gates for {dtype} lack {', '.join(missing)}")
    return g


def apply(records: list[dict], gates: dict, dtype: str, logits_summary: dict, kl_floor: float | None = None) -> dict:
    """Gate every record in place; returns the logits verdict. ``kl_floor`` (bf16 only, optional): the per-token
    KL max of HF-bf16 against HF-fp32; when given, the logits KL gate follows the module rule,
    ``floor_multiplier * kl_floor + logits_kl_max``, instead of ``logits_kl_max`` alone."""
    g = _gate_numbers(gates, dtype)
    exact_names = set(gates.get("exact", []) or [])
    for rec in records:
        exact = rec["gate_class"] == "exact" or rec["name"] in exact_names or rec["kind"] in exact_names
        rel = rec.get("rel_l2")
        rel = math.inf if rel is None or (isinstance(rel, float) and math.isnan(rel)) else rel
        if exact:
            rec["gate"] = {"metric": "max_abs", "max": 0.0}
            ok = rec.get("max_abs") == 0.0
        elif dtype == "float32":
            limit = g.get("logits_rel_l2", g["rel_l2"]) if rec["kind"] == "logits" else g["rel_l2"]
            rec["gate"] = {"metric": "rel_l2", "max": limit}
            ok = rel <= limit
        else:
            floor = rec.get("floor")
            if floor is None or (isinstance(floor, float) and math.isnan(floor)):
                limit = g["floor_abs"]  # no floor could be measured: only the absolute allowance
            else:
                limit = g["floor_multiplier"] * floor + g["floor_abs"]
            rec["gate"] = {"metric": "rel_l2", "max": limit, "floor_multiplier": g["floor_multiplier"],
                           "floor_abs": g["floor_abs"]}
            rec["ratio"] = (rel / floor) if floor else None
            ok = rel <= limit
        router = rec.get("router")
        if router is not None and rec["mode"] == "isolated" and router.get("decisive_flips", 0) > 0:
            ok = False
            rec["why"] = f"{router['decisive_flips']} decisive top-k flips"
        rec["passed"] = bool(ok)
        rec.setdefault("ratio", None)
    kl_gate = g.get("kl_max") if dtype == "float32" else g.get("logits_kl_max")
    if kl_gate is not None and kl_floor is not None and dtype != "float32" and not math.isnan(kl_floor):
        kl_gate = g["floor_multiplier"] * kl_floor + kl_gate
    logits_ok = all(r["passed"] for r in records if r["kind"] == "logits")
    if kl_gate is not None:
        logits_ok = logits_ok and logits_summary["kl_max"] <= kl_gate
    return {"passed": None, "logits_ok": logits_ok, "kl_gate": kl_gate, "kl_floor": kl_floor}


def summarise(records: list[dict], verdict: dict, logits_summary: dict) -> dict:
    failing = [r for r in records if not r["passed"]]
    # A row failing only end-to-end while the same module passes in isolation was fed wrong inputs: the fault
    # lies upstream (possibly an inline step of its parent, e.g. RoPE or V inside self_attn), not in it.
    replay_ok = {r["name"] for r in records if r["mode"] == "isolated" and r["passed"]}
    own = [r for r in failing if r["mode"] == "isolated" or r["kind"] in ("mask", "rope") or r["name"] not in replay_ok]
    first = min(own or failing, key=lambda r: (r["order"], r["mode"] != "isolated")) if failing else None
    modules_ok = not any(r for r in failing if r["kind"] not in ("router",))
    router_rows = [r for r in records if r["kind"] == "router"]
    routers = []
    for r in router_rows:
        if r["mode"] != "end_to_end":
            continue
        iso = next((x for x in router_rows if x["name"] == r["name"] and x["mode"] == "isolated"), None)
        routers.append({"layer": r["layer"], "name": r["name"], **r["router"],
                        "isolated_decisive_flips": iso["router"]["decisive_flips"] if iso else None})
    router_ok = all(r["passed"] for r in router_rows)
    logits = {k: logits_summary[k] for k in ("cosine", "rel_l2", "max_abs", "top1_agreement", "kl_mean", "kl_max",
                                             "kl_p95", "top1_decisive_agreement", "n_decisive", "n_near_tie", "decisive_share",
                                             "top1_flips_decisive", "top1_flips_near_tie", "top5_overlap", "kl_max_floor", "kl_gate",
                                             "worst_positions") if k in logits_summary}
    detail = None
    if first:
        detail = {"name": first["name"], "megatron_name": first["megatron_name"], "mode": first["mode"],
                  "metric": first["gate"]["metric"], "value": first.get(first["gate"]["metric"]),
                  "gate": first["gate"]["max"], "why": first.get("why") or first.get("detail")}
    layer_rows = [r for r in records if r["kind"] == "layer" and r["mode"] == "end_to_end"]
    worst = max(layer_rows, key=lambda r: r["rel_l2"] or 0.0) if layer_rows else None
    for r in records:
        r.setdefault("group", "text")
    return {
        "summary": {"first_divergence": first["name"] if first else None, "first_divergence_detail": detail,
                    "worst_layer": {"layer": worst["layer"], "name": worst["name"], "rel_l2": worst["rel_l2"]}
                    if worst else None,
                    "logits": logits, "n_modules": len(records), "n_failed": len(failing)},
        "modules": records,
        "routers": routers,
        "checks": {"logits": verdict["logits_ok"], "modules": modules_ok, "router": router_ok},
    }
