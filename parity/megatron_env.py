"""Process-group setup for megatron-core: one CPU process (gloo, no port) or a torchrun world."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from parity import compat


_SEQUENCE_PARALLEL = [False]  # the run's megatron sequence parallelism (a case's parallel.sequence_parallel)


def init(tp: int = 1, ep: int = 1, seed: int = 0, backend: str | None = None, sequence_parallel: bool = False,
         etp: int | None = None) -> None:
    """Initialise torch.distributed (if needed) and megatron's model-parallel state for TP x EP, the experts' own
    tensor parallelism ``etp`` (None: megatron's default, = TP); ``sequence_parallel`` is recorded for the systems that
    build their models (``ranks``)."""
    compat.apply()
    _SEQUENCE_PARALLEL[0] = bool(sequence_parallel)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    current = (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_tensor_model_parallel_world_size() == tp
        and parallel_state.get_expert_model_parallel_world_size() == ep
        and parallel_state.get_expert_tensor_parallel_world_size() == (tp if etp is None else etp)
    )
    if not current:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=etp
        )
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)


def ranks() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return dict(
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(), etp_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=_SEQUENCE_PARALLEL[0],
    )
