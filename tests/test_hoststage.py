"""Host staging: what goes in comes back bit for bit, also while the GPU keeps overwriting the source."""
from __future__ import annotations

import pytest
import torch

from parity.bridge.convert import same_bits
from parity.engine.hoststage import HostStage, stage_bytes


def test_cpu_stage_is_a_copy():
    stage = HostStage()
    x = torch.randn(5, 7)
    y = stage.put(x)
    x.add_(1.0)  # the staged copy must not follow the source
    assert torch.equal(y + 1.0, x) and y.data_ptr() != x.data_ptr()
    stage.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (page-locked staging)")
def test_cuda_stage_async_exact_and_pinned():
    stage = HostStage(chunk_bytes=1 << 20)
    src = [torch.randn(257, 129, device="cuda", dtype=dt) for dt in (torch.bfloat16, torch.float32)] * 40
    want = [s.cpu() for s in src]
    got = [stage.put(s) for s in src]
    for s in src:  # overwrite the sources right away: the copies were ordered before
        s.fill_(float("nan"))
    del src
    torch.cuda.empty_cache()
    stage.sync()
    assert all(same_bits(g, w) for g, w in zip(got, want))
    assert stage.pinned_bytes >= stage.staged_bytes > 0  # chunks were page-locked
    big = torch.arange(3 << 20, device="cuda", dtype=torch.int32)  # larger than one chunk: its own chunk
    out = stage.put(big)
    stage.sync()
    assert torch.equal(out, big.cpu())
    stage.close()
    assert stage.pinned_bytes == 0 and stage_bytes([big, big, big.view(-1), torch.zeros(3)]) == (3 << 20) * 4 and torch.equal(out, big.cpu())  # unpinned, still readable


def test_running_out_of_host_memory_is_one_line(monkeypatch):
    from parity.errors import UserError

    def refuse(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    stage = HostStage()
    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(UserError, match=r"^out of host memory: staging needs 1\.0 GiB more") as e:
        stage._new_chunk(1 << 30)
    assert "\n" not in str(e.value)
    stage._new_chunk_in_thread(1 << 30)  # a background failure surfaces in the caller's thread
    with pytest.raises(UserError):
        stage._ready()


def test_a_spilled_stage_keeps_its_bytes_in_an_unlinked_file(tmp_path):
    """``spill_dir``: chunks are files there, mapped and unlinked at once (nothing left on disk, whatever ends the
    run); what goes in comes back bit for bit, in place; what the disk has no room for (its free space less a 2 GiB
    margin) goes to host memory as without spilling, counted in ``spill_short``."""
    import shutil
    from collections import namedtuple

    stage = HostStage(chunk_bytes=1 << 16, reserve=1 << 20, background=True, spill_dir=str(tmp_path))
    src = [torch.randn(33, 65, dtype=dt) for dt in (torch.bfloat16, torch.float32)] * 8 + [torch.arange(1 << 19)]
    got = [stage.put(s) for s in src]
    stage.sync()
    assert all(same_bits(g, s) for g, s in zip(got, src)) and all(g.data_ptr() != s.data_ptr() for g, s in zip(got, src))
    assert stage.staged_bytes == sum(s.numel() * s.element_size() for s in src) and stage.pinned_bytes == 0
    assert stage.spilled_bytes == (1 << 20) + (4 << 20)  # the reserve, then a chunk of the large tensor's size
    assert list(tmp_path.iterdir()) == []  # unlinked: the mappings alone hold the bytes
    stage.close()
    assert all(same_bits(g, s) for g, s in zip(got, src))
    usage = namedtuple("usage", "total used free")
    with pytest.MonkeyPatch.context() as mp:  # 3 MiB of room past the margin: the reserve takes it, then the host
        mp.setattr(shutil, "disk_usage", lambda d: usage(1 << 40, 1 << 40, (2 << 30) + (3 << 20)))
        short = HostStage(chunk_bytes=1 << 20, reserve=4 << 20, spill_dir=str(tmp_path))
        a, b = torch.randn(1 << 19), torch.randn(1 << 19)  # 2 MiB each
        got = [short.put(a), short.put(b)]
        assert short.spilled_bytes == 3 << 20 and short.spill_short == 2 << 20
        assert same_bits(got[0], a) and same_bits(got[1], b)
