"""Multi-process runs (TP x EP): torchrun + NCCL on GPUs, or a gloo world of CPU processes.

Every rank builds the (tiny or full) HF reference and its own Megatron shard from the HF state dict; module
outputs that are tensor-parallel shards (fused QKV, gated fc1, q/k norms per head, vocab-parallel logits) are
all-gathered before comparison, and the round trip exports from every rank's shard (gathered) back to HF.
Rank 0 writes the results. ``python -m parity.engine.distributed --case NAME --out FILE`` is what
``launch`` starts under torchrun.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch


def launch(case, *, device=None, dtype=None, checkpoint=None, seed=None, progress=False) -> dict:
    """Start ``tp*ep`` processes with torchrun for ``case`` and return rank 0's results."""
    world = case.world_size if hasattr(case, "world_size") else case["parallel"]["tp"] * case["parallel"]["ep"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "parity.engine.distributed", "--case", str(getattr(case, "path", None) or case.name),
               "--out", out]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.engine.distributed")
    ap.add_argument("--case", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--checkpoint")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    from parity.cases import load_case
    from parity.engine.run import run_case

    case = load_case(a.case)
    results = run_case(case, device=a.device, dtype=a.dtype, checkpoint=a.checkpoint, seed=a.seed,
                       progress=a.progress and int(os.environ.get("RANK", 0)) == 0)
    if int(os.environ.get("RANK", 0)) == 0:
        with open(a.out, "w") as f:
            json.dump(results, f, default=str)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
