"""Phase timing (and, on CUDA, peak memory per phase) of a run, with optional progress lines on stderr."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch


class Progress:
    def __init__(self, enabled: bool, held=None):
        self.enabled = enabled
        self.held = held  # () -> str: what a run holds on the host (``Reference.held_text``), added to each phase line
        self.phases: dict[str, float] = {}
        self.gpu_peaks: dict[str, float] = {}  # GiB, per phase
        self.parts: dict[str, float] = {}  # seconds of a phase's named parts (``part``): "phase.part" -> s
        self._phase: str | None = None

    @contextmanager
    def phase(self, name: str):
        self.note(f"{name} ...", indent="")
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        outer, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = outer
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.gpu_peaks[name] = max(self.gpu_peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
            if self.enabled:
                held = f"; {self.held()}" if self.held is not None else ""
                self.note(f"{name} done in {self.phases[name]:.2f}s ({memory()}{held})", indent="")

    @contextmanager
    def part(self, name: str):
        """Time one named part of the current phase (summed over its entries, the device synchronised at both ends
        so that queued work is charged where it was queued): where a phase's seconds go, in ``phase_parts``."""
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize()
            key = f"{self._phase}.{name}"
            self.parts[key] = self.parts.get(key, 0.0) + time.perf_counter() - t0

    def note(self, msg: str, indent: str = "  "):
        if self.enabled:
            print(f"[parity] {indent}{msg}", file=sys.stderr, flush=True)


def memory() -> str:
    """Host memory now and at its peak (resident set, Linux), and the device's peak of the phase so far: what a run
    killed for memory leaves in its log."""
    status = {}
    try:
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        pass
    gib = lambda k: int(status[k].split()[0]) / 2**20 if k in status else float("nan")  # noqa: E731
    out = f"host {gib('VmRSS'):.1f} GiB, peak {gib('VmHWM'):.1f}"
    if torch.cuda.is_available():
        out += f"; GPU {torch.cuda.memory_allocated() / 2**30:.1f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.1f}"
    return out


def timed(fn, device, repeats: int = 2) -> float:
    """Plain forward time (no hooks, no capture): one warm-up, then the best of ``repeats``."""
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                best = min(best, time.perf_counter() - t0)
            del out
    return best
