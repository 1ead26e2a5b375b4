"""What every test's gloo world of CPU processes needs: a free port, and each spawned rank's environment."""
from __future__ import annotations

import os
import socket

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


def digest(r: dict) -> dict:
    """What a test of a run in a world reads back from rank 0 (a run's results are too large to ship whole)."""
    return {"passed": r["passed"], "parallel": r["parallel"], "checks": r["checks"],
            "first": r["summary"]["first_divergence_detail"],
            "failed": sorted((m["name"], m["mode"]) for m in r["modules"] if m.get("passed") is False),
            "rows": {(m["name"], m["mode"]): m.get("rel_l2") for m in r["modules"]},
            "modes": {m["name"]: m.get("why") for m in r["modes"]}, "train": r.get("train")}


def case_worker(rank, world, port, case, system, variants, path):
    """Rank ``rank`` running case ``case`` against ``system`` once per variant, ``{name: (reference, causes, plant)}``:
    the HF reference built under ``reference()`` (a context manager factory, or None: the case's own), Megatron-Bridge
    with the named defaults switched off (``causes_removed``: diagnostic builds), ``plant(monkeypatch)`` applied to
    the system's run (or None). One reference per distinct ``reference``; rank 0 saves ``{name: digest}``."""
    import contextlib

    import pytest

    join(rank, world, port)
    from parity.cases import load_case
    from parity.engine import pipeline

    out, refs = {}, {}
    try:
        for name, (reference, causes, plant) in variants.items():
            if reference not in refs:
                with (reference() if reference else contextlib.nullcontext()):
                    refs[reference] = pipeline.reference(load_case(case), device="cpu", seed=0)
            mp = pytest.MonkeyPatch()
            try:
                if plant is not None:
                    plant(mp)
                removed = contextlib.nullcontext()
                if causes:  # (imports Megatron-Bridge)
                    from tests.test_megatron_bridge_backward import causes_removed

                    removed = causes_removed(*causes)
                with removed:
                    out[name] = digest(pipeline.against(refs[reference], system))
            finally:
                mp.undo()
    finally:
        for ref in refs.values():
            ref.close()
    if rank == 0:
        torch.save(out, path)


def run_case(case: str, system: str, world: int, **variants):
    """``case_worker`` on ``world`` processes: ``{variant: digest}`` (rank 0's)."""
    return spawn(case_worker, world, case, system, variants)
