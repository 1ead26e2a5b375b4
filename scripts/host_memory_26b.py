"""Host memory of gemma4-26b-a4b-train, phase by phase, measured on a scaled shape on the CPU (docs/training.md).

The 26B train case with fewer layers (sliding and full in turn: the real width 2816, 128 experts of 704, 512
positions) and a smaller vocabulary (the embedding's share is added by arithmetic), run on the CPU as ``python -m
parity run --progress`` runs it against one system (the run against the last system: what only the backward reads is
released after it). Each phase's progress line gives the resident set and what the reference holds on the host by
category (``Reference.held``). On the CPU the "device" tensors are host tensors too: the resident set also counts
HF's model and the system's, which a GPU run keeps on the card; the categories say which is which.

    PYTHONPATH=. python scripts/host_memory_26b.py [--layers 2] [--vocab 16384] [--experts 128] [--system parity] 2> log
"""
from __future__ import annotations

import argparse


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--experts", type=int, default=128, help="fewer experts where the host has not the memory for "
                    "the real 128 (a CPU run holds HF's model and the system's too); the parameters' share is arithmetic")
    ap.add_argument("--system", default="parity")
    a = ap.parse_args()
    from parity.cases import load_case
    from parity.engine import pipeline

    types = ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(a.layers)]
    case = load_case("gemma4-26b-a4b-train").replace(
        devices=["cpu", "cuda"], inputs={"seq_len": a.seq_len},
        model={"overrides": {"num_hidden_layers": a.layers, "layer_types": types, "vocab_size": a.vocab,
                             "num_experts": a.experts}})
    r = pipeline.run_systems(case, [a.system], device="cpu", progress=True)[0]
    print({"passed": r["passed"], "phases_s": r["phases"], "host_rss_gib": r["peak_memory"]["host_rss_gib"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
