"""What every test's gloo world of CPU processes needs: a free port, and each spawned rank's environment."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import NamedTuple

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    """This spawned process as rank ``rank`` of ``world`` (torch.distributed's environment), one thread each."""
    import tempfile

    # each rank its own inductor cache: megatron-core's fused activations are torch.compile'd (its jit_fuser), and
    # four ranks compiling the same CPU kernel at once in one cache dir failed with a C++ compile error (at TP=4, on a
    # recompile with dynamic shapes); with a cache per rank it compiles
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank),
                      TORCHINDUCTOR_CACHE_DIR=os.path.join(tempfile.gettempdir(), f"torchinductor_rank{rank}"))
    torch.set_num_threads(1)


def spawn(worker, world: int, *args):
    """``worker(rank, world, port, *args, path)`` on ``world`` processes; what rank 0 saved at ``path``
    (``torch.save``: a file, not a queue, whose pipe fills up before the parent reads it). A free port can be taken
    by a parallel test between probing and binding: tried up to three times."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digests.pt")
        for attempt in range(3):
            try:
                mp.spawn(worker, args=(world, free_port(), *args, path), nprocs=world)
                break
            except mp.ProcessRaisedException as e:
                if "EADDRINUSE" not in str(e) or attempt == 2:
                    raise
        return torch.load(path)


ISOLATED_BACKWARD = ("isolated_grad_input", "isolated_param_grad")  # each module's backward alone
END_TO_END_BACKWARD = ("loss", "grad_input", "param_grad")  # one backward end to end


def _first_failing(r: dict, modes) -> str | None:
    """The name of the first failing row (in the run's order) among ``modes``; None where none fails."""
    bad = [m for m in r["modules"] if m["mode"] in modes and m.get("passed") is False]
    return min(bad, key=lambda m: m["order"])["name"] if bad else None


def _counts(lora: dict, export: str) -> dict:
    """A LoRA export's (``export`` or ``merged``) tensor counts: HF's, the system's, bit-exact; None where none."""
    return {k: (lora.get(export) or {}).get(k) for k in ("hf", "exported", "bit_exact")}


def digest(r: dict) -> dict:
    """What a test of a run in a world reads back from rank 0 (a run's results are too large to ship whole): its
    verdict and rows, the system's ``failures`` (``(phase, method, error)``), and its LoRA exports: ``export`` and
    ``merged`` (their tensor counts), ``logits`` (their logits entries), ``export_loads`` (None where no LoRA)."""
    lora = r.get("lora") or {}
    return {"passed": r["passed"], "parallel": r["parallel"], "checks": r["checks"],
            "first": r["summary"]["first_divergence_detail"],
            "first_isolated": _first_failing(r, ISOLATED_BACKWARD), "first_e2e": _first_failing(r, END_TO_END_BACKWARD),
            "failed": sorted((m["name"], m["mode"]) for m in r["modules"] if m.get("passed") is False),
            "rows": {(m["name"], m["mode"]): m.get("rel_l2") for m in r["modules"]},
            "modes": {m["name"]: m.get("why") for m in r["modes"]}, "train": r.get("train"),
            "failures": [(f["phase"], f.get("method"), f["error"]) for f in r.get("failures") or []],
            "export": _counts(lora, "export"), "merged": _counts(lora, "merged"),
            "logits": {k: lora.get(f"{k}_logits") for k in ("export", "merged")},
            "export_loads": lora.get("export_loads")}


class Variant(NamedTuple):
    """One run of ``case_worker`` (a plain tuple is its first fields, in order)."""

    reference: Callable | None = None  # a context manager factory the HF reference is built under
    causes: tuple = ()  # Megatron-Bridge's defaults switched off (``causes_removed``)
    plant: Callable | None = None  # ``plant(monkeypatch)``, applied to the system's run
    seed: int = 0
    case: str | None = None  # a case name in place of ``run_case``'s
    edit: Callable | None = None  # ``edit(case) -> case``, applied before the reference is built
    after: Callable | None = None  # ``after(reference, system)``: the system as the run built it


def case_worker(rank, world, port, case, system, variants, path):
    """Rank ``rank`` running case ``case`` against ``system`` once per variant, in order. A variant is a ``Variant``
    or a tuple of its first fields (``(reference, causes, plant)`` or ``(reference, causes, plant, seed)``): case
    ``variant.case`` (or ``case``) loaded and ``edit(case)`` where given, its HF reference built under
    ``reference()`` (a context manager factory, or None: the case's own) with seed ``seed`` (0 where not given),
    Megatron-Bridge with the named defaults switched off (``causes_removed``: diagnostic builds), ``plant(monkeypatch)``
    applied to the system's run (or None); its digest saved, with ``after(reference, system)`` (the system the run
    built) under ``"after"`` where given. Or a variant is a function, ``check(rank)``, run in the world at that point
    (megatron's parallel state as the runs before it left it); what it returns saved as is. One reference per
    distinct ``(case, edit, reference, seed)``, closed after the last variant that uses it; rank 0 saves
    ``{name: digest or check's result}``."""
    import contextlib

    import pytest

    join(rank, world, port)
    from parity import registry
    from parity.cases import load_case
    from parity.engine import pipeline

    runs = {name: Variant(*v) for name, v in variants.items() if not callable(v)}
    keys = {name: (v.case or case, v.edit, v.reference, v.seed) for name, v in runs.items()}
    last = {key: name for name, key in keys.items()}  # the last use of each reference
    out, refs, built, get = {}, {}, [], registry.get  # built: the system an ``after`` reads
    try:
        for name, variant in variants.items():
            if name not in runs:
                out[name] = variant(rank)
                continue
            v, key = runs[name], keys[name]
            if key not in refs:
                with (v.reference() if v.reference else contextlib.nullcontext()):
                    loaded = load_case(key[0])
                    refs[key] = pipeline.reference(v.edit(loaded) if v.edit else loaded, device="cpu", seed=v.seed)
            mp = pytest.MonkeyPatch()
            try:
                if v.plant is not None:
                    v.plant(mp)
                if v.after is not None:  # the system the pipeline builds, kept
                    mp.setattr(registry, "get", lambda n: built.append(get(n)) or built[-1])
                removed = contextlib.nullcontext()
                if v.causes:  # (imports Megatron-Bridge)
                    from tests.test_megatron_bridge_backward import causes_removed

                    removed = causes_removed(*v.causes)
                with removed:
                    out[name] = digest(pipeline.against(refs[key], system))
                    if v.after is not None:
                        out[name]["after"] = v.after(refs[key], built.pop())
            finally:
                mp.undo()
            if last[key] == name:
                refs.pop(key).close()
    finally:
        for ref in refs.values():
            ref.close()
    if rank == 0:
        torch.save(out, path)


def run_case(case: str, system: str, world: int, **variants):
    """``case_worker`` on ``world`` processes: ``{variant: digest}`` (rank 0's)."""
    return spawn(case_worker, world, case, system, variants)
