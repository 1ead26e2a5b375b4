"""Multi-process runs (TP x EP): torchrun + NCCL on GPUs, or a gloo world of CPU processes.

Every rank builds the (tiny or full) HF reference and its own Megatron shard from the HF state dict; module
outputs that are tensor-parallel shards (fused QKV, gated fc1, q/k norms per head, vocab-parallel logits) are
all-gathered before comparison, and the round trip exports from every rank's shard (gathered) back to HF.
Rank 0 writes the results (a list: one per system). ``python -m parity.engine.distributed --case NAME --out FILE`` is what
``parity.engine.launch`` starts under torchrun.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.engine.distributed")
    ap.add_argument("--case", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    ap.add_argument("--checkpoint")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--system", default="parity", help="comma-separated: several against one HF reference")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args(argv)
    from parity.cases import default_device, load_case
    from parity.engine.launch import cpu_threads
    from parity.engine.pipeline import run_systems

    case = load_case(a.case)
    device = a.device or default_device(case, torch.cuda.is_available())
    with cpu_threads(device):
        results = run_systems(case, a.system.split(","), device=device, dtype=a.dtype, checkpoint=a.checkpoint,
                              seed=a.seed, progress=a.progress and int(os.environ.get("RANK", 0)) == 0)
    if int(os.environ.get("RANK", 0)) == 0:
        with open(a.out, "w") as f:
            json.dump(results, f, default=str)
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
