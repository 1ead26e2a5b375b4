"""Gates: the numbers come from the case file (``[gates]``), never from constants in code.

- float32: every module's rel-L2 <= ``gates.float32.rel_l2`` (round-off); logits rel-L2 <=
  ``logits_rel_l2`` and per-token KL max <= ``kl_max``.
- bfloat16, each module against its *floor* (the same module's rel-L2 of HF-bf16 against HF-fp32, same mode):
  - parity: rel-L2 (Megatron-bf16 vs HF-bf16) <= ``floor_multiplier`` * floor + ``floor_abs``;
  - accuracy against the truth, when the record carries ``truth_rel_l2`` (Megatron-bf16 vs HF-fp32) and the
    case states ``truth_multiplier`` (rho): ``truth_rel_l2 <= rho * floor + truth_abs`` -- "is Megatron-bf16 as
    close to fp32 as HF-bf16 is?", the question a precision-only error (a combine or softmax in bf16 where HF
    uses fp32) fails;
  - a floor is a measurement, never a licence: with ``ceiling_rel_l2`` stated, no floor-relative gate exceeds
    it, and a floor above it marks the row "reference unstable" (it fails and says so) instead of widening
    the gate -- unless the system agrees with HF-bf16 to the case's float32 gate for the row's mode (it computes
    what HF computes, to round-off: HF's instability is then the system's too, no more), or the row is not a
    replay and every replayed row of its layer passes (``clear_unstable``: each of its modules computes what HF's
    does on HF's inputs); either way the row passes and says so.
  Logits KL max <= ``floor_multiplier`` * KL floor + ``logits_kl_max`` (a small absolute term), capped by
  ``ceiling_kl_max`` the same way; with a truth KL given, ``KL(HF-fp32 || Megatron-bf16) <= rho * KL floor +
  logits_kl_max`` too. The ratio to the floor is reported.
- exact: rows whose kind is deterministic elementwise (embedding scale, masks) and names listed in
  ``gates.exact`` must match bit for bit (max-abs 0) in any dtype (forward rows only).
- gradient rows (modes whose ``gate_key`` is ``grad_rel_l2``: the backward mode) are judged by that number.
- routers: the gated value is the rel-L2 of the routing weights over the tokens whose top-k *sets agree*
  (``agree_weight_rel_l2``; a flip moves weight wholesale and would inflate any all-token number); in
  isolated mode a decisive top-k flip fails (near-ties are counted and reported with their margins).
- rows of a mode whose gate section is ``float32`` (``parity.engine.modes``: the fp32 replay, a bf16 run's
  modules replayed in fp32 on both sides) are gated by the fp32 numbers in any run.
- a record that carries ``missing`` (a twin never called, on either side) or ``raised`` (the system raised
  while running it) fails with that reason.
- any divergence is a verdict: a row with non-finite values at compared positions (either side, even the same
  on both) fails and says how many; so does a module the two sides called a different number of times
  (``calls``, end to end); shapes that differ were compared after a reshape, or failed, and say so (``layout``).
"""
from __future__ import annotations

import math

from parity.engine import modes as M
from parity.engine.alignment import MOE_BLOCK
from parity.engine.record import Record
from parity.errors import UserError

_DEFAULTS_REQUIRED = {"float32": ("rel_l2",), "bfloat16": ("floor_multiplier", "floor_abs")}


def _gate_numbers(gates: dict, dtype: str) -> dict:
    g = {k: v for k, v in dict(gates.get(dtype) or {}).items() if v is not None}
    missing = [k for k in _DEFAULTS_REQUIRED.get(dtype, ()) if k not in g]
    if missing:
        raise UserError(f"case gates for {dtype} lack {', '.join(missing)}")
    return g


def _num(x) -> float | None:
    """A measured number, or None when there is none (None, NaN)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _bad(x) -> float:
    """A measured error for a ``<=`` test: nothing measured (None, NaN) is an infinite error."""
    v = _num(x)
    return math.inf if v is None else v


def floor_limit(floor: float | None, multiplier: float, absolute: float, ceiling: float | None) -> tuple[float, bool]:
    """``(limit, unstable)``: ``multiplier * floor + absolute`` (``absolute`` alone without a floor), never above
    ``ceiling``; ``unstable`` when the floor itself exceeds the ceiling (the reference is too noisy to judge)."""
    limit = absolute if floor is None else multiplier * floor + absolute
    if ceiling is None:
        return limit, False
    return min(limit, ceiling), floor is not None and floor > ceiling


def _value(rec: Record) -> float:
    """The gated error of a record: routers by their agreeing tokens' weights, everything else by rel-L2."""
    router = rec.router
    if rec.kind == "router" and router is not None and "agree_weight_rel_l2" in router:
        rec.agree_weight_rel_l2 = router["agree_weight_rel_l2"]
        return _bad(router["agree_weight_rel_l2"])
    return _bad(rec.rel_l2)


def _metric(rec: Record) -> str:
    return "agree_weight_rel_l2" if rec.agree_weight_rel_l2 is not None else "rel_l2"


def _fp32_gated(rec: Record) -> bool:
    """A row of a mode judged by the case's float32 gates in any run (the fp32 replay)."""
    mode = M.get(rec.mode)
    return mode is not None and mode.gates == "float32"


def _gate_bf16(rec: Record, g: dict, same: float) -> bool:
    """``rec`` against its floor (``g``: the case's bf16 gates); ``same``: the float32 gate of its mode, the
    agreement with HF-bf16 that passes a row whose reference is unstable."""
    floor = _num(rec.floor)
    ceiling = g.get("ceiling_rel_l2")
    value, metric = _value(rec), _metric(rec)
    limit, unstable = floor_limit(floor, g["floor_multiplier"], g["floor_abs"], ceiling)
    rec.gate = {"metric": metric, "max": limit, "floor_multiplier": g["floor_multiplier"],
                   "floor_abs": g["floor_abs"], "ceiling": ceiling}
    rec.ratio = (value / floor) if floor else None
    if unstable:
        rec.why = (f"reference unstable: HF's own bf16 error (vs HF-fp32) {floor:.3g} exceeds the case "
                      f"ceiling {ceiling:g}")
        rec.unstable = True
        if value > same:
            return False
        rec.gate = {"metric": metric, "max": same, "ceiling": ceiling}  # the fp32 gate: round-off agreement
        rec.why += (f"; the system agrees with HF-bf16 to the float32 gate ({value:.3g} <= {same:g}): it computes "
                    f"what HF computes")
        return True
    ok = value <= limit
    truth = rec.truth_rel_l2
    if "truth_multiplier" in g and rec.truth_rel_l2 is not None:
        grad = (M.get(rec.mode) is not None and M.get(rec.mode).gate_key == "grad_rel_l2")
        rho = g.get("grad_truth_multiplier", g["truth_multiplier"]) if grad else g["truth_multiplier"]
        t_abs = g.get("truth_abs", g["floor_abs"])
        t_limit, _ = floor_limit(floor, rho, t_abs, ceiling)
        rec.truth_gate = {"metric": "truth_rel_l2", "max": t_limit, "truth_multiplier": rho, "truth_abs": t_abs}
        rec.truth_ratio = (_bad(truth) / floor) if floor else None
        if _bad(truth) > t_limit:
            if ok:  # the parity gate held: the truth gate is the one that failed, and the row says so
                rec.gate = dict(rec.truth_gate, ceiling=ceiling)
            rec.why = (f"accuracy: {_bad(truth):.3g} from HF-fp32 > {rho:g} x HF-bf16's {floor if floor else 0:.3g}"
                          f" + {t_abs:g}")
            ok = False
    return ok


def _nonfinite(rec: Record) -> str | None:
    """Why a row with non-finite values at compared positions fails (either side, even where both agree)."""
    ref_n, test_n = rec.nonfinite or (0, 0)
    if not (ref_n or test_n):
        return None
    where = [f"{test_n} in the system's output"] if test_n else []
    return "non-finite values: " + ", ".join(where + ([f"{ref_n} in HF's"] if ref_n else []))


def record_judge(gates: dict, dtype: str):
    """``judge(rec) -> bool``: one record gated in place by the case's ``gates`` for a run of ``dtype`` (what
    ``apply`` does to every record; a mode that searches its inputs judges each candidate with it)."""
    g = _gate_numbers(gates, dtype)
    g32 = _gate_numbers(gates, "float32") if dtype != "float32" else g
    exact_names = set(gates.get("exact", []) or [])

    def judge(rec: Record) -> bool:
        mode = M.get(rec.mode)
        key = mode.gate_key if mode is not None else "rel_l2"  # gradients: grad_rel_l2
        exact = key == "rel_l2" and (rec.gate_class == "exact" or rec.name in exact_names or rec.kind in exact_names)
        if rec.missing or rec.raised:
            rec.gate = {"metric": "rel_l2", "max": 0.0}
            rec.why = rec.raised or rec.missing
            ok = False
        elif exact:
            rec.gate = {"metric": "max_abs", "max": 0.0}
            ok = rec.max_abs == 0.0
        elif dtype == "float32" or _fp32_gated(rec):
            g_ = g32 if _fp32_gated(rec) else g
            limit = g_[key] if key != "rel_l2" else g_.get("logits_rel_l2", g_["rel_l2"]) if rec.kind == "logits" \
                else g_["rel_l2"]
            value = _value(rec)
            rec.gate = {"metric": _metric(rec), "max": limit}
            ok = value <= limit
        else:
            ok = _gate_bf16(rec, g, g32.get(key, g32["rel_l2"]))
        router = rec.router
        if router is not None and M.is_replay(rec.mode) and router.get("decisive_flips", 0) > 0:
            ok = False
            margins = ", ".join(f"{f['margin']:.2g}" for f in router.get("flip_margins", [])[:3])
            rec.why = f"{router['decisive_flips']} decisive top-k flips" + (f" (margins {margins})" if margins else "")
        nonfinite = _nonfinite(rec)
        if nonfinite:
            ok, rec.why = False, nonfinite
        if rec.calls:
            ok, rec.why = False, (f"called {rec.calls[1]} times by the system, {rec.calls[0]} times by HF "
                                  f"(compared: the first call)")
        rec.passed = bool(ok)
        return rec.passed
    return judge


def clear_unstable(records: list[Record]) -> None:
    """A row failing only as "reference unstable" (HF's own bf16 error over the ceiling) in a mode that is not a
    replay is HF's precision speaking, not the system, when every module of its layer computes what HF's does fed
    HF's own inputs: then it passes and says so. The replays (each module alone on HF's captured inputs and output
    gradients, in the run's dtype and in fp32) are the evidence; a layer with any replayed row failing, or with none
    measured, leaves the row failing, as does a row outside the layers (the loss, the logits, the embedding)."""
    replays: dict[tuple, list[Record]] = {}
    for r in records:
        if M.is_replay(r.mode) and r.gate_class is not None and r.layer is not None:
            replays.setdefault((r.group, r.layer), []).append(r)
    for rec in records:
        if not rec.unstable or rec.passed or M.is_replay(rec.mode) or rec.layer is None \
                or not (rec.why or "").startswith("reference unstable"):
            continue
        mine = replays.get((rec.group, rec.layer), [])
        if mine and all(r.passed for r in mine):
            rec.passed = True
            truth = "" if rec.truth_rel_l2 is None else f"; {rec.truth_rel_l2:.3g} from HF-fp32"
            rec.why += (f"; every replayed row of its layer passes ({len(mine)}: each module alone on HF's inputs, "
                        f"in bf16 and fp32): HF's own bf16 instability, not the system's{truth}")


def note_routing(records: list[Record]) -> None:
    """A failing row of a layer's MoE block (``alignment.MOE_BLOCK``: the router, the experts, the norms around them)
    whose router sends some tokens to other experts end to end than HF's does, while alone on HF's inputs it routes
    every token as HF: the row says so (its verdict stands; in ``why``, else in ``detail``). A flip is discrete: the
    flipped tokens' outputs come from other experts, and the block's parameter gradients sum over them, so a drift the
    forward gates accept can move whole rows (measured: Megatron-Bridge's bf16 step, docs/megatron-bridge-findings.md)."""
    flips, alone = {}, {}
    for r in records:
        if r.router is None or r.layer is None:
            continue
        if r.mode == "end_to_end" and r.router.get("n_set_mismatch"):
            flips[(r.group, r.layer)] = r.router
        elif M.is_replay(r.mode):
            alone[(r.group, r.layer)] = alone.get((r.group, r.layer), 0) + r.router.get("n_set_mismatch", 0)
    for rec in records:
        key = (rec.group, rec.layer)
        if rec.passed or M.is_replay(rec.mode) or rec.router is not None or key not in flips \
                or not MOE_BLOCK.search(rec.name):
            continue
        rt = flips[key]
        n, total, decisive = rt["n_set_mismatch"], rt.get("n_tokens"), rt.get("decisive_flips", 0)
        same = " while alone, on HF's inputs, it routes every token as HF" if alone.get(key) == 0 else ""
        note = (f"its layer's router sends {n} of {total} tokens to other experts end to end ({decisive} decisive by "
                f"HF's margin){same}: its MoE block's outputs and parameter gradients take other experts' "
                f"contributions there")
        if rec.why:
            rec.why = f"{rec.why}; {note}"
        else:
            rec.detail = f"{rec.detail}; {note}" if rec.detail else note


def apply(records: list[Record], gates: dict, dtype: str, logits_summary: dict, kl_floor: float | None = None,
          kl_truth: float | None = None) -> dict:
    """Gate every record in place; returns the logits verdict. ``kl_floor`` (bf16 only, optional): the per-token
    KL max of HF-bf16 against HF-fp32; when given, the logits KL gate is ``floor_multiplier * kl_floor +
    logits_kl_max`` (capped by ``ceiling_kl_max``) instead of ``logits_kl_max`` alone. ``kl_truth`` (bf16 only,
    optional): the per-token KL max of Megatron-bf16 against HF-fp32, gated by ``truth_multiplier``."""
    g = _gate_numbers(gates, dtype)
    judge = record_judge(gates, dtype)
    for rec in records:
        judge(rec)
    clear_unstable(records)
    note_routing(records)
    out = {"passed": None, "kl_floor": kl_floor, "kl_truth": kl_truth, "kl_truth_gate": None, "logits_why": None}
    logits_ok = all(r.passed for r in records if r.kind == "logits" and not (M.get(r.mode) and M.get(r.mode).rows))
    kl = _bad(logits_summary.get("kl_max"))
    if dtype == "float32":
        kl_gate = g.get("kl_max")
    else:
        kl_abs = g.get("logits_kl_max")
        kl_gate = kl_abs
        floor = _num(kl_floor)
        if kl_abs is not None:
            kl_gate, unstable = floor_limit(floor, g["floor_multiplier"], kl_abs, g.get("ceiling_kl_max"))
            if unstable:
                logits_ok = False
                out["logits_why"] = (f"reference unstable: HF's own bf16 logits KL max (vs HF-fp32) {floor:.3g} "
                                     f"exceeds the case ceiling {g['ceiling_kl_max']:g}")
            if kl_truth is not None and "truth_multiplier" in g:
                t_gate, _ = floor_limit(floor, g["truth_multiplier"], kl_abs, g.get("ceiling_kl_max"))
                out["kl_truth_gate"] = t_gate
                if _bad(kl_truth) > t_gate:
                    logits_ok = False
                    out["logits_why"] = out["logits_why"] or (
                        f"accuracy: logits KL max {_bad(kl_truth):.3g} from HF-fp32 > {g['truth_multiplier']:g} x "
                        f"HF-bf16's {floor if floor else 0:.3g} + {kl_abs:g}")
    if kl_gate is not None and kl > kl_gate:
        logits_ok = False
        out["logits_why"] = out["logits_why"] or f"logits KL max {kl:.3g} > gate {kl_gate:.3g}"
    out.update(logits_ok=logits_ok, kl_gate=kl_gate)
    return out


def summarise(records: list[Record], verdict: dict, logits_summary: dict) -> dict:
    failing = [r for r in records if not r.passed]
    # A row failing only end-to-end while the same module passes in isolation was fed wrong inputs: the fault
    # lies upstream (possibly an inline step of its parent, e.g. RoPE or V inside self_attn), not in it.
    # The replays (isolated in the run's dtype, fp32_replay in fp32) feed each module the same inputs on both
    # sides: a module whose replay fails is at fault itself.
    replay_bad = {r.name for r in failing if M.is_replay(r.mode)}
    replay_ok = {r.name for r in records if M.is_replay(r.mode) and r.passed} - replay_bad
    # A backward mode names the rows a module computes itself from the gradient it is given (its input and
    # parameter gradients, the loss); a failing gradient of its output only carries a later module's fault.
    # A module called another number of times than its twin, or one the system raised in, is at fault itself.
    def own_row(r) -> bool:
        mode = M.get(r.mode)
        if mode is not None and mode.own_rows:
            return r.mode in mode.own_rows
        return M.is_replay(r.mode) or r.kind in ("mask", "rope") or r.name not in replay_ok or bool(r.calls) \
            or bool(r.raised)
    own = [r for r in failing if own_row(r)]
    # a "reference unstable" row speaks of HF's precision, never of where the system went wrong: the first divergence
    # is the first row failing on its own numbers when there is one (a plant in a layer makes that layer's unstable
    # rows fail with it, clear_unstable no longer applying, and they may come first in the backward's order)
    measured = [r for r in own if not r.unstable]
    first = min(measured or own or failing, key=lambda r: (r.order, M.rank(r.mode))) if failing else None
    own_check = {r.mode: M.get(r.mode).check for r in records if M.get(r.mode) is not None and M.get(r.mode).check}
    modules_ok = not any(r for r in failing if r.kind not in ("router",) and r.mode not in own_check)
    router_rows = [r for r in records if r.kind == "router"]
    routers = []
    for r in router_rows:
        if r.mode != "end_to_end" or r.router is None:
            continue
        iso = next((x for x in router_rows if x.name == r.name and x.mode == "isolated"), None)
        routers.append({"layer": r.layer, "name": r.name, **r.router,
                        "isolated_decisive_flips": iso.router["decisive_flips"] if iso and iso.router
                        else None})
    router_ok = all(r.passed for r in router_rows)
    logits = {k: logits_summary[k] for k in ("cosine", "rel_l2", "max_abs", "top1_agreement", "kl_mean", "kl_max",
                                             "kl_p95", "top1_decisive_agreement", "n_decisive", "n_near_tie",
                                             "decisive_share", "top1_flips_decisive", "top1_flips_near_tie",
                                             "top5_overlap", "kl_max_floor", "kl_gate", "kl_truth", "kl_truth_gate",
                                             "worst_positions", "layout") if k in logits_summary}
    if verdict.get("logits_why"):
        logits["why"] = verdict["logits_why"]
    detail = None
    if first:
        detail = {"name": first.name, "megatron_name": first.megatron_name, "mode": first.mode,
                  "metric": first.gate["metric"], "value": getattr(first, first.gate["metric"]),
                  "gate": first.gate["max"], "why": first.why or first.detail}
        if first.probe:  # a probing row: the input it failed on (and the search's example)
            detail["probe"] = first.probe
            if first.example:
                detail["example"] = first.example
    layer_rows = [r for r in records if r.kind == "layer" and r.mode == "end_to_end"]
    worst = max(layer_rows, key=lambda r: r.rel_l2 or 0.0) if layer_rows else None
    return {
        "summary": {"first_divergence": first.name if first else None, "first_divergence_detail": detail,
                    "worst_layer": {"layer": worst.layer, "name": worst.name, "rel_l2": worst.rel_l2}
                    if worst else None,
                    "logits": logits, "n_modules": len(records), "n_failed": len(failing),
                    "n_unstable": sum(1 for r in records if r.unstable),
                    "n_unstable_cleared": sum(1 for r in records if r.unstable and r.passed)},
        "modules": [r.to_dict() for r in records],
        "routers": routers,
        "checks": {"logits": verdict["logits_ok"], "modules": modules_ok, "router": router_ok,
                   **{check: not any(own_check.get(r.mode) == check for r in failing)
                      for check in dict.fromkeys(own_check.values())}},
    }
