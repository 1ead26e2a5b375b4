"""Ctrl-C: exit 130 at any moment, and never half a report.

``python -m parity`` calls ``install()`` before it imports anything heavy: from then on SIGINT ends the process
at once with exit 130 and one line on stderr. A ``KeyboardInterrupt`` raised inside an import (numpy, torch,
transformers) can surface as another error, abort the process (exit 134) or be swallowed; a run holds nothing
that a clean exit would save, since every file is written through ``uninterrupted``.

``uninterrupted()`` holds SIGINT back while a block runs (a report written whole: results.json, its page, the
history) and delivers it when the block ends, to whichever handler was in force (``install``'s exit, pytest's
``KeyboardInterrupt``). Off the main thread, where Python cannot change signal handlers, it does nothing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

EXIT_INTERRUPTED = 130
MESSAGE = b"parity: interrupted\n"


def _exit(signum, frame) -> None:  # noqa: ANN001 - a signal handler
    os.write(2, MESSAGE)
    os._exit(EXIT_INTERRUPTED)


def install() -> None:
    """Ctrl-C ends the process with exit 130 (except inside ``uninterrupted``, which delivers it afterwards)."""
    signal.signal(signal.SIGINT, _exit)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold SIGINT back until the block is done, then deliver it to the handler that was in force."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if held:
            signal.raise_signal(signal.SIGINT)
