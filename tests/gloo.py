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
