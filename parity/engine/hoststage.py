"""Page-locked host memory for what a sequential GPU run moves off the card.

A run that must not hold HF and Megatron on one GPU at once parks two things on the host: the captured HF
activations (about 21 GB at the 26B-A4B shape and 4,096 tokens) and the HF weights kept for conversion and
the round trip (about 47 GB). Through pageable memory those copies run at ~1 GB/s and block the forward;
here they go into large page-locked chunks (pinned once with ``cudaHostRegister``, exact size: torch's
caching host allocator would round every tensor up to a power of two) on a side stream, so the device
keeps computing while the copies drain. ``sync()`` before anything reads what was staged.

Without CUDA (or when pinning is refused) the stage is a plain synchronous copy to the host.
"""
from __future__ import annotations

import ctypes
import threading

import torch

_ALIGN = 256


def storage_key(t: torch.Tensor) -> tuple:
    """Identity of a tensor's bytes: the same key means the same memory seen the same way (tied weights,
    a module's output that is the next one's input)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def stage_bytes(tensors) -> int:
    """Host bytes a stage needs for the CUDA tensors among ``tensors``, each storage once."""
    keys = {storage_key(t): t.numel() * t.element_size() for t in tensors if t.is_cuda}
    return sum(_aligned(n) for n in keys.values())


def host_bytes(tensors, seen: set | None = None) -> int:
    """Host bytes held by the tensors among ``tensors`` (nested in lists, tuples and dicts), each storage once; a
    storage already in ``seen`` (filled here) is not counted again (categories of one account, in order)."""
    seen = set() if seen is None else seen
    total = 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu" and x.layout == torch.strided:
                s = x.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
    walk(tensors)
    return total


def trim() -> None:
    """Give the allocator's freed host memory back to the system (glibc's ``malloc_trim``; elsewhere a no-op): tensors
    under its mmap threshold are freed into its heap, which the resident set keeps until trimmed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


SPILL_MARGIN = 2 << 30  # free disk a spilling stage leaves alone


def spill_room(directory: str) -> int:
    """Bytes a stage may still spill to ``directory``: its free disk less ``SPILL_MARGIN``."""
    import shutil

    return max(0, shutil.disk_usage(directory).free - SPILL_MARGIN)


def _spill_chunk(directory: str, nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory backed by a file in ``directory``: a sparse file mapped shared and unlinked at once
    (nothing is left behind, whatever ends the run; the space is the disk's until the last tensor on it goes). Its
    pages are the page cache's: written back to the disk as they fill and dropped under memory pressure, so they never
    count against the host's memory as page-locked or anonymous memory does."""
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="parity-spill-", dir=directory)
    try:
        os.ftruncate(fd, nbytes)
        return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(path)


def spill_dir() -> str:
    """Where a stage that spills puts its files: ``PARITY_SPILL_DIR``, else the temporary folder."""
    import os
    import tempfile

    return os.environ.get("PARITY_SPILL_DIR") or tempfile.gettempdir()


class HostStage:
    """Bump allocator over page-locked host chunks. ``reserve`` bytes are pinned up front as the first chunk;
    with ``background`` that happens in a thread (CPU work: faulting pages in and locking them) while the GPU
    goes on, and the first ``put`` waits for it. Running out of host memory is a ``UserError`` (one line).
    With ``spill_dir`` the chunks are memory-mapped files there instead (``_spill_chunk``) while its disk has room."""

    def __init__(self, chunk_bytes: int = 2 << 30, reserve: int = 0, background: bool = False,
                 spill_dir: str | None = None):
        self.cuda = torch.cuda.is_available()
        self.spill_dir = spill_dir  # chunks are files there, memory-mapped and unlinked (``_spill_chunk``)
        self.spilled_bytes = 0
        self.spill_short = 0  # bytes a spilling stage had to hold in host memory: the disk had no room
        self._spill_budget: int | None = None
        self.chunk_bytes = chunk_bytes
        self._chunks: list[tuple[torch.Tensor, bool]] = []  # (uint8 base, registered)
        self._used = 0  # bytes used in the last chunk
        self._stream = torch.cuda.Stream() if self.cuda else None
        self.staged_bytes = 0
        self.pinned_bytes = 0
        self._pinning: threading.Thread | None = None
        self._failure: BaseException | None = None
        if (self.cuda or spill_dir is not None) and reserve:
            if background:
                self._pinning = threading.Thread(target=self._new_chunk_in_thread, args=(reserve,), daemon=True)
                self._pinning.start()
            else:
                self._new_chunk(reserve)

    def _new_chunk_in_thread(self, nbytes: int) -> None:
        try:
            self._new_chunk(nbytes)
        except BaseException as e:  # re-raised in the caller's thread by _ready()
            self._failure = e

    def _ready(self) -> None:
        if self._pinning is not None:
            self._pinning.join()
            self._pinning = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    @property
    def chunks(self) -> list[torch.Tensor]:
        """The host chunks (reserved, page-locked where CUDA allowed it), whether or not filled yet; never waits for the
        background pinning (a chunk still being pinned is not listed yet)."""
        return [base for base, _ in self._chunks]

    # -------------------------------------------------------------------------------- allocation
    def _new_chunk(self, nbytes: int, minimum: int = 1) -> None:
        """A chunk of ``nbytes``; a spilling stage's in a file while the disk has room (as much of ``nbytes`` as
        it has, at least ``minimum``), else page-locked as any stage's (``spill_short`` counts those bytes)."""
        if self.spill_dir is not None:
            if self._spill_budget is None:  # the disk's room when the stage first spills (its files are sparse: the
                self._spill_budget = spill_room(self.spill_dir)  # free space shrinks only as they are written)
            size = min(nbytes, self._spill_budget - self.spilled_bytes)
            if size >= minimum:
                self._chunks.append((_spill_chunk(self.spill_dir, size), False))
                self.spilled_bytes += size
                self._used = 0
                return
            self.spill_short += nbytes
        try:
            base = torch.empty(nbytes, dtype=torch.uint8)
        except RuntimeError as e:  # the allocator's "can't allocate memory"
            from parity.errors import UserError
            raise UserError(f"out of host memory: staging needs {nbytes / 2**30:.1f} GiB more "
                            f"(already {sum(c[0].numel() for c in self._chunks) / 2**30:.1f} GiB); a sequential "
                            f"26B-A4B run needs ~72 GB of host RAM per process") from e
        base.zero_()  # fault the pages in with all CPU threads; registering then only locks them
        ok = self.cuda and int(torch.cuda.cudart().cudaHostRegister(base.data_ptr(), nbytes, 0)) == 0
        if ok:
            self.pinned_bytes += nbytes
        self._chunks.append((base, ok))
        self._used = 0

    def _take(self, nbytes: int) -> torch.Tensor:
        need = _aligned(nbytes)
        if not self._chunks or self._used + need > self._chunks[-1][0].numel():
            self._new_chunk(max(need, self.chunk_bytes), minimum=need)
        base = self._chunks[-1][0]
        out = base[self._used:self._used + nbytes]
        self._used += need
        return out

    # -------------------------------------------------------------------------------- staging
    def put(self, x: torch.Tensor) -> torch.Tensor:
        """A host copy of ``x`` (contiguous); asynchronous for CUDA tensors until ``sync()``, except into a spilled
        chunk (a file's pages: a plain copy, which the kernel writes back as it goes)."""
        x = x.detach()
        spill = self.spill_dir is not None and x.numel() > 0
        if not (spill or self.cuda and x.is_cuda) or x.numel() == 0:
            return x.to("cpu", copy=True)
        self._ready()
        dst = self._take(x.numel() * x.element_size()).view(x.dtype).view(x.shape)
        self.staged_bytes += dst.numel() * dst.element_size()
        if not (x.is_cuda and self._chunks[-1][1]):  # not page-locked: a spilled chunk, or x on the host
            dst.copy_(x)
            return dst
        self._stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self._stream):
            dst.copy_(x, non_blocking=True)
        x.record_stream(self._stream)  # the caching allocator must not reuse x's memory before the copy ran
        return dst

    def sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def close(self) -> None:
        """Unpin (the memory itself lives on while staged tensors refer to it)."""
        self._ready()
        self.sync()
        for base, registered in self._chunks:
            if registered:
                torch.cuda.cudart().cudaHostUnregister(base.data_ptr())
        self._chunks.clear()
        self.pinned_bytes = 0

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.close()
        except Exception:
            pass
