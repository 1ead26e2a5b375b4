"""Starting a run, for every front door (the CLI, ``bench``, the pytest plugin): where it runs, in this
process or under torchrun, and with a fixed number of CPU threads.

A CPU run uses one torch thread for its duration (then the caller's count is restored): the order of
floating-point reductions, hence the last bits of every metric, then does not depend on the machine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager

from parity.errors import UserError


def resolve_device(case, requested: str | None, checkpoint: str | None, checkpoint_hint: str = "--checkpoint DIR") -> str:
    """The device a case runs on here, or a ``UserError`` saying why it cannot run as asked."""
    import torch

    from parity.cases import default_device, unmet_requirement

    cuda = torch.cuda.is_available()
    device = requested or default_device(case, cuda)
    why = unmet_requirement(case, device=device, checkpoint=checkpoint, cuda_available=cuda,
                            device_count=torch.cuda.device_count() if cuda else 0, checkpoint_hint=checkpoint_hint)
    if why is not None:
        if requested == "cuda" and not cuda:
            why = f"--device cuda, but no CUDA GPU is available here (case {case.name})"
        elif why.startswith("needs CUDA"):
            why = (f"case {case.name} runs on {', '.join(case.devices)} only" +
                   (", and no CUDA GPU is available here" if not cuda else f", not on {device}"))
        raise UserError(why)
    return device


def distributed_available() -> bool:
    return importlib.util.find_spec("parity.engine.distributed") is not None


@contextmanager
def cpu_threads(device: str, threads: int = 1):
    """``threads`` torch threads for a CPU run, the caller's count restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(case, *, device: str, dtype: str | None = None, checkpoint: str | None = None, seed: int | None = None,
            progress: bool = False, system: str = "parity") -> dict:
    """Run a case against one system (see ``execute_systems``)."""
    return execute_systems(case, device=device, dtype=dtype, checkpoint=checkpoint, seed=seed, progress=progress,
                           systems=[system])[0]


def execute_systems(case, *, device: str, dtype: str | None = None, checkpoint: str | None = None,
                    seed: int | None = None, progress: bool = False, systems: list[str]) -> list[dict]:
    """Run a case against each system of ``systems`` (one HF reference for all): in this process, or through
    torchrun when its world size (tp * ep) is above 1. One results dict per system, in order."""
    if case.world_size > 1:
        if not distributed_available():
            raise UserError(f"case {case.name} needs a multi-GPU launch (parity.engine.distributed), "
                            f"which this install lacks")
        return torchrun(case, device=device, dtype=dtype, checkpoint=checkpoint, seed=seed, progress=progress,
                        systems=systems)
    from parity.engine.pipeline import run_systems

    with cpu_threads(device):
        return run_systems(case, systems, device=device, dtype=dtype, checkpoint=checkpoint, seed=seed,
                           progress=progress)


def torchrun(case, *, device=None, dtype=None, checkpoint=None, seed=None, progress=False,
             systems=("parity",)) -> list[dict]:
    """Start ``tp*ep`` processes with torchrun for ``case`` and return rank 0's results, one per system."""
    world = case.world_size
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "parity.engine.distributed", "--case", str(getattr(case, "path", None) or case.name),
               "--out", out, "--system", ",".join(systems)]
        for flag, value in (("--device", device), ("--dtype", dtype), ("--checkpoint", checkpoint),
                            ("--seed", seed)):
            if value is not None:
                cmd += [flag, str(value)]
        if progress:
            cmd.append("--progress")
        proc = subprocess.run(cmd, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"distributed run of {case.name} failed (torchrun exit {proc.returncode})")
        with open(out) as f:
            return json.load(f)
