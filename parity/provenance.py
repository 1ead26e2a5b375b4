"""Where a run came from: the harness's git commit and whether its tree had local edits, each package's own
version, the device, the CPU thread count, the seed and the command line (``results["env"]``); and the
third-party notices printed while it ran (``third_party_notices``), kept out of the terminal.

Versions come from the installed distributions' metadata (``importlib.metadata``), never from a package's
``__version__``: megatron-core's ``__version__`` appends ``git rev-parse HEAD`` run inside its own folder,
which, for a wheel installed into a virtual environment that lives inside another repository, is *that*
repository's commit (``0.19.2+<harness commit>``), not megatron's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

# distribution name -> key in ``env`` (the first three keep the keys results.json always had)
PACKAGES = {"torch": "torch", "transformers": "transformers", "megatron-core": "megatron_core",
            "megatron-bridge": "megatron_bridge", "numpy": "numpy", "safetensors": "safetensors"}
ROOT = Path(__file__).resolve().parent.parent  # the harness checkout (parity/..)


# where a distribution without metadata (a source tree on PYTHONPATH) keeps its own release number
_SOURCE_VERSION = {"torch": ("torch", "__version__"), "transformers": ("transformers", "__version__"),
                   "megatron-core": ("megatron.core.package_info", "__shortversion__")}


def package_version(dist: str) -> str | None:
    """The installed distribution's own version string, or None when it is not installed.

    Without distribution metadata (a source checkout on ``PYTHONPATH``), an already imported module's
    release number is used, marked ``(source)``.
    """
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    module, attr = _SOURCE_VERSION.get(dist, ("", ""))
    value = getattr(sys.modules.get(module), attr, None) if module else None
    return f"{value} (source)" if value else None


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(root: Path = ROOT) -> dict:
    """``{git_commit, git_dirty, git_changes}`` of the checkout at ``root``; all None outside a git checkout.

    Dirty means tracked files differ from the commit (staged or not); untracked files (reports, caches) do
    not count. ``git_changes`` is the number of such files.
    """
    commit = _git("rev-parse", "--short=12", "HEAD", root=root)
    if commit is None:
        return {"git_commit": None, "git_dirty": None, "git_changes": None}
    status = _git("status", "--porcelain", "--untracked-files=no", root=root)
    changed = [line for line in (status or "").splitlines() if line.strip()]
    return {"git_commit": commit.strip() or None, "git_dirty": bool(changed) if status is not None else None,
            "git_changes": len(changed) if status is not None else None}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def threads() -> int | None:
    """torch's intra-op thread count (CPU results depend on it: reductions split differently)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    return torch.get_num_threads()


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a shell would take it (``python -m parity run ...``, ``pytest ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(os.path.join("parity", "__main__.py")):
        argv[0:1] = ["-m", "parity"]
    elif argv and os.path.basename(argv[0]) in ("pytest", "py.test"):
        return shlex.join(["pytest", *argv[1:]])
    elif argv and argv[0].endswith(os.path.join("pytest", "__main__.py")):
        argv[0:1] = ["-m", "pytest"]
    return shlex.join([os.path.basename(sys.executable) or "python", *argv])


def collect(device: str, *, seed: int | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The provenance of a run on ``device``: versions, git state, host, device, threads, seed, command."""
    env: dict[str, Any] = {"python": platform.python_version()}
    for dist, key in PACKAGES.items():
        v = package_version(dist)
        if v is not None or key in ("torch", "transformers", "megatron_core"):
            env[key] = v
    env.update(git_state())
    env.update({"host": platform.node(), "device_name": device_name(device), "threads": threads(),
                "command": command_line(argv)})
    if seed is not None:
        env["seed"] = seed
    return env


# ------------------------------------------------------------------------------------- third-party notices

NOTICE_LOGGERS = ("transformers", "megatron", "torch")  # libraries whose log records are notices, not results


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # noqa: BLE001 - a broken third-party format string is not our failure
            text = str(record.msg)
        _add(self.sink, f"{record.name}: {text}")


def _add(sink: list[str], text: str) -> None:
    if text not in sink:
        sink.append(text)


def _where(filename: str) -> str:
    """A warning's file as ``package/module.py`` (the part after site-packages / dist-packages)."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[parts.index(marker) + 1:])
    return filename


@contextlib.contextmanager
def third_party_notices(sink: list[str]) -> Iterator[list[str]]:
    """Collect third-party warnings and library log records (Transformer Engine/Apex absent, cuda graphs,
    deprecated arguments) into ``sink`` instead of printing them; the harness's own warnings still show.

    Each notice is one line, ``UserWarning: message (megatron/core/optimizer/__init__.py:25)`` or
    ``transformers.modeling_utils: message``, each once. The CLI prints them with ``--verbose``; the run's
    report keeps them (``env.warnings``).
    """
    try:  # transformers attaches its stderr handler when first imported: let it do so now, then detach it
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")
    except ImportError:  # pragma: no cover
        pass
    loggers = [logging.getLogger(n) for n in NOTICE_LOGGERS]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    handler = _Collect(sink)
    own = str(ROOT / "parity")
    with warnings.catch_warnings():  # the filters in force decide what is shown; this decides where
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if str(filename).startswith(own):  # ours: shown as it would have been
                shown(message, category, filename, lineno, file, line)
            else:
                _add(sink, f"{category.__name__}: {' '.join(str(message).split())} "
                           f"({_where(str(filename))}:{lineno})")

        warnings.showwarning = show
        for lg in loggers:
            if lg.name == "transformers":  # its own stderr handler, and no propagation: replace both for now
                lg.handlers = []
            lg.addHandler(handler)
            lg.propagate = False
        try:
            yield sink
        finally:
            for lg, handlers, propagate in saved:
                lg.removeHandler(handler)
                if lg.name == "transformers":
                    lg.handlers = handlers
                lg.propagate = propagate
