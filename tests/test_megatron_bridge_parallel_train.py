"""Megatron-Bridge's training step over two ranks (EP=2: ``gemma4-text-tiny-train-ep2-megatron-bridge``) in a gloo
world of CPU processes: every rank runs its GPT step on its shard with the same batch, megatron-core's
``finalize_model_grads`` (its DDP's data-parallel average: EP=2 is data-parallel size 2), its gradients come back
through its own export (which gathers the experts of both ranks), and its optimizer steps each rank's shards clipped
by megatron's global gradient norm over the ranks (the experts' over the expert-parallel group).

With its provider's defaults the gradients fail where its known training-step findings say (10: the fused cross
entropy's bf16 logits gradient, first at ``lm_head``'s input gradient); with those findings removed
(``causes_removed``: 10, 11 and 2, a diagnostic build) every gradient row, the first updates and the trajectory agree,
as at EP=1. Parallel-only errors planted in its step (the forward bit for bit unchanged) fail at their row.

TP=2 is not run: megatron-core's MoE layer trains at TP > 1 with sequence parallelism only, which the TE stand-ins
do not model (``parity.mbridge.training.train_loss`` says so). Skips where megatron-bridge is not importable."""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from parity import mbridge

OK, WHY = mbridge.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Megatron-Bridge not importable: {WHY}")

CASE = "gemma4-text-tiny-train-ep2-megatron-bridge"
SYSTEM = "megatron-bridge"
FORWARD = ("end_to_end", "isolated")
GRADIENTS = ("loss", "grad_output", "grad_input", "param_grad")
ISOLATED = ("isolated_grad_input", "isolated_param_grad")
STEP = ("param_step",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(r: dict) -> dict:
    rows = {(m["name"], m["mode"]): m.get("rel_l2") for m in r["modules"]
            if m["mode"] in FORWARD + GRADIENTS + ISOLATED + STEP}
    bad = [m for m in r["modules"] if m["mode"] in ("loss", "grad_input", "param_grad") and m.get("passed") is False]
    return {"passed": r["passed"], "checks": r["checks"], "first": r["summary"]["first_divergence_detail"],
            "rows": rows, "first_e2e": min(bad, key=lambda m: m["order"])["name"] if bad else None,
            "failed": sorted((m["name"], m["mode"]) for m in r["modules"] if m.get("passed") is False),
            "modes": {m["name"]: m.get("why") for m in r["modes"]}, "loss": r.get("train", {}).get("loss"),
            "trajectory": r.get("train", {}).get("trajectory"), "parallel": r["parallel"]}


def experts_not_averaged(mp_):
    """Its DDP's 1/dp left out for the experts (their gradients summed over the data-parallel ranks whose tokens
    they already saw through the dispatcher): each expert gradient doubled at EP=2. Forward unchanged."""
    from megatron.core import parallel_state as ps

    from parity.systems import megatron_bridge as SB

    finalize = SB.finalize_grads

    def planted(chunk, config, experts):
        finalize(chunk, config, experts)
        for p in chunk.parameters():
            if id(p) in experts and p.grad is not None:
                p.grad.mul_(ps.get_data_parallel_world_size())
    mp_.setattr(SB, "finalize_grads", planted)


def experts_norm_local(mp_):
    """The optimizer's global gradient norm taking the experts' gradients as dense ones (summed over the
    model-parallel group, not the expert-parallel group): each rank clips by its own experts' norm. Gradients
    unchanged."""
    from parity.systems import megatron_bridge as SB

    mp_.setattr(SB.MegatronBridgeSystem, "_grad_norm",
                lambda self, pairs: SB.grad_norm(pairs, set(), next(self.model.parameters()).device))


PLANTS = {"experts not averaged over DP": experts_not_averaged, "experts' norm not over EP": experts_norm_local}


def _worker(rank, world, port, case_name, seeds, plants, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from parity.cases import load_case
    from parity.engine import pipeline
    from tests.test_megatron_bridge_backward import ALL_CAUSES, causes_removed

    case, out = load_case(case_name), {}  # a CUDA case file (torchrun + NCCL), run here in a gloo world of CPUs
    for seed in seeds:
        ref = pipeline.reference(case, device="cpu", seed=seed)
        with causes_removed(*ALL_CAUSES):
            out[seed] = _digest(pipeline.against(ref, SYSTEM))
            for name in plants if seed == seeds[0] else ():
                patch = pytest.MonkeyPatch()
                try:
                    PLANTS[name](patch)
                    out[name] = _digest(pipeline.against(ref, SYSTEM))
                finally:
                    patch.undo()
        if seed == seeds[0]:
            out["default"] = _digest(pipeline.against(ref, SYSTEM))  # every default of its provider: the case
        ref.close()
    if rank == 0:
        torch.save(out, path)


def _run(case: str = CASE, seeds=(0,), plants=tuple(PLANTS)) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "digests.pt")
        for attempt in range(3):  # a free port can be taken by a parallel test between probing and binding
            try:
                mp.spawn(_worker, args=(2, _free_port(), case, seeds, plants, path), nprocs=2)
                break
            except mp.ProcessRaisedException as e:
                if "EADDRINUSE" not in str(e) or attempt == 2:
                    raise
        return torch.load(path)


@pytest.fixture(scope="module")
def world() -> dict:
    return _run()


if __name__ == "__main__":  # a digest of the world, for measuring
    import json
    import sys

    sys.path.insert(0, os.getcwd())
    out = _run(sys.argv[1], tuple(int(x) for x in sys.argv[2].split(',')), tuple(sys.argv[3:]))
    for k, r in out.items():
        grads = {key: v for key, v in r["rows"].items() if key[1] in GRADIENTS and v is not None}
        steps = [v for key, v in r["rows"].items() if key[1] in STEP and v is not None]
        iso = [v for key, v in r["rows"].items() if key[1] in ISOLATED and v is not None]
        worst = max(grads.items(), key=lambda kv: kv[1]) if grads else None
        print(json.dumps({"run": str(k), "passed": r["passed"], "checks": r["checks"], "first": r["first"],
                          "first_e2e": r["first_e2e"], "n_failed": len(r["failed"]), "failed": r["failed"][:6],
                          "counts": {m: sum(key[1] == m for key in grads) for m in GRADIENTS},
                          "worst": [list(worst[0]), worst[1]] if grads else None, "n_iso": len(iso), "iso_worst": max(iso or [0]),
                          "n_step": len(steps), "step_worst": max(steps or [0]), "loss": r["loss"],
                          "traj": r["trajectory"], "modes": r["modes"], "parallel": r["parallel"]}, default=str))
