"""End to end: the system's forward on the raw inputs, every aligned module compared as it returns.

Floors: HF's forward again in fp32 (the model kind's ``forward_fp32``: a layer-at-a-time fp32 copy at full
size), each module compared at once with the bf16 capture; the logits, and the per-token KL max of HF-bf16
against HF-fp32 (``KL_FLOOR``: the logits KL gate's floor).
"""
from __future__ import annotations

import copy

import torch

from parity.engine import metrics as M
from parity.engine.alignment import TABLE_KINDS, Aligned, Kind
from parity.engine.compare import floor_value, input_hooks, value
from parity.engine.system import HarnessError, SystemRaised

MODE = "end_to_end"
KL_FLOOR = "logits_kl_max"  # key of the logits KL floor among this mode's floors


def run(c, prog) -> None:
    """A hook on every module a captured row names: the first time a module returns, each of its rows is
    compared at once with HF's output (nothing is kept); then the logits. Every call is counted: a module the
    system calls a different number of times than HF calls its twin fails (``calls``). A system whose output
    cannot be brought to HF's layout fails that row (``raised``); an error of the engine's own hook ends the run
    as the harness error it is."""
    sut, by_module = c.sut, {}
    for a in c.rows:
        name = c.name(a)
        if isinstance(name, str) and a.row.kind not in TABLE_KINDS and sut.module(name) is not None:
            by_module.setdefault(name, []).append(a)
    done: dict[str, object] = {}  # HF name -> its record
    calls: dict[str, int] = {}  # system module -> times called

    def hook(module, out, name: str, rows: list[Aligned]):
        calls[name] = calls.get(name, 0) + 1
        for a in rows:
            call = c.cap.first(a.hf)
            if call is None or a.hf in done:
                continue
            try:
                test = sut.output(a, out, module)
            except SystemRaised as e:
                done[a.hf] = c.raised(a, MODE, name, e)
                continue
            try:
                done[a.hf] = c.record(a, MODE, value(a.row.kind, call.output), test)
            except Exception as e:  # the engine's own error, raised inside the system's forward: not the system's
                raise HarnessError(f"end-to-end hook at {a.hf}: {type(e).__name__}: {e}") from e

    handles = [sut.module(name).register_forward_hook(lambda m, i, o, name=name, rows=rows: hook(m, o, name, rows))
               for name, rows in by_module.items()]
    try:
        with torch.no_grad():
            c.logits = sut.forward(c.ref.inputs)
    finally:
        for h in handles:
            h.remove()
    for name, rows in by_module.items():  # a module called another number of times than its HF twin
        for a in rows:
            rec, hf_calls = done.get(a.hf), len(c.cap.calls.get(a.hf, []))
            if rec is not None and a.row.input_of is None and calls.get(name, 0) != hf_calls:
                rec.calls = [hf_calls, calls.get(name, 0)]
    c.record(next(a for a in c.rows if a.row.kind is Kind.LOGITS), MODE, c.cap.first("logits").output, c.logits)


def floors(ref, prog) -> dict[str, float]:
    """Each module of the model kind's fp32 forward against the bf16 capture (only the scalar rel-L2 is kept);
    then the logits and the KL floor."""
    rows, cap, where = ref.rows, ref.cap, ref.where
    by_name = {a.hf: a.row.kind for a in rows if a.row.kind not in TABLE_KINDS}
    out: dict[str, float] = {}

    def measure(name, y):
        if name not in out and cap.first(name) is not None:
            out[name] = floor_value(by_name[name], y, cap.first(name).output, where)

    def run_copy(module, name, *args, **kwargs):  # a deep fp32 copy of ``module``, hooked, run once, dropped
        mod32 = copy.deepcopy(module).float()
        handles = input_hooks(mod32, rows, measure)
        for rel, sub in mod32.named_modules():
            full = f"{name}.{rel}" if name and rel else (name or rel)
            if full in by_name:
                handles.append(sub.register_forward_hook(lambda m, a, y, full=full: measure(full, y)))
        try:
            with torch.no_grad():
                return mod32(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    logits = ref.kind.forward_fp32(ref.model, ref.inputs, cap, run_copy, prog)
    hf_logits = cap.first("logits").output
    out["logits"] = floor_value(Kind.LOGITS, logits, hf_logits, where)
    out[KL_FLOOR] = float(M.logits_metrics(logits, hf_logits.to(logits.device).float(),
                                           where.valid.to(logits.device))["kl_max"])
    return out
