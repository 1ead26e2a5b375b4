"""Where reports live on disk, and tables of them.

Layout of a report root (e.g. ``reports/``)::

    reports/index.html                                   history of every run (regenerated on each write)
    reports/runs/<UTC stamp>-<case>-<random>/results.json
    reports/runs/<UTC stamp>-<case>-<random>/index.html  self-contained report of that run
    reports/sessions/<UTC stamp>-<random>.json           a pytest session: the cases it ran, skipped (why), errored

Runs never overwrite each other: each gets a fresh directory made with ``mkdir(exist_ok=False)``, and every
file is written to a temporary file in the same directory and moved into place with ``os.replace`` (readers
never see half a file). Concurrent writers (e.g. pytest-xdist workers) each land their own run; the history
page is regenerated under a file lock, so the last writer's index lists every run. A report is written under
``parity.interrupts.uninterrupted``: Ctrl-C waits until it is whole. ``check_root`` / ``check_out`` say, before
anything runs, why a folder cannot take reports.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from parity.interrupts import uninterrupted
from parity.report import summary as S
from parity.report.history import find_previous, record, render_index, run_links
from parity.report.html import render_run

RESULTS = "results.json"
REPORT = "index.html"
RUNS = "runs"
SESSIONS = "sessions"

try:  # POSIX only; elsewhere the history page is still written atomically, just without the lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def dumps(results: dict) -> str:
    """``results`` as JSON text (NaN/inf kept as Python's json writes them; numpy scalars become numbers)."""
    return json.dumps(results, indent=1, default=_json_default) + "\n"


def _write_temp(path: Path, text: str) -> str:
    """``text`` fsynced into a temporary file beside ``path``; returns its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` atomically (readers see the old or the new file, never a partial one)."""
    with uninterrupted():
        tmp = _write_temp(path, text)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise



def _create_new(path: Path, text: str) -> None:
    """Write ``path`` atomically, failing with FileExistsError if it exists (also against a racing writer)."""
    tmp = _write_temp(path, text)
    try:
        try:
            os.link(tmp, path)  # atomic, never replaces an existing file
        except FileExistsError:
            raise
        except OSError:  # filesystem without hard links
            if path.exists():
                raise FileExistsError(f"{path} already exists") from None
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _stamp() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


def _token() -> str:
    return secrets.token_hex(3)


def _slug(case: Any) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(case or "run")).strip("-.")
    return slug[:60] or "run"


def _new_run_dir(runs: Path, case: Any, attempts: int = 20) -> Path:
    runs.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        d = runs / f"{_stamp()}-{_slug(case)}-{_token()}"
        try:
            d.mkdir(exist_ok=False)
            return d
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a fresh run directory under {runs} after {attempts} attempts")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run_meta(run_dir: Path) -> dict:
    return {"id": run_dir.name, "dir": str(run_dir), "href": f"{RUNS}/{run_dir.name}/{REPORT}"}


def _public(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "_run"}


def write_run(results: dict, root: Path) -> Path:
    """Store one run under ``root/runs/<UTC stamp>-<case>-<random>/`` and regenerate ``root/index.html``.

    The run is compared with the most recent earlier run of the same case, system, device and dtype already
    under ``root``: ``results.json`` carries that comparison as ``regressions`` (``history.record``: the
    previous run, the rule, the flags), and the page links the history, the previous run, the last passing
    one and the start of a failing streak. Returns the new run directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    results = _public(results)
    if not S.parse_time(results.get("created")):  # the history orders runs by it
        results["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    runs = load_runs(root, warn=False)
    previous = find_previous(results, runs)
    results["regressions"] = record(results, previous)
    links = run_links(results, runs)
    page = render_run(results, previous, links)
    with uninterrupted():  # the run folder appears with both files, or not at all
        run_dir = _new_run_dir(root / RUNS, results.get("case"))
        atomic_write(run_dir / REPORT, page)
        atomic_write(run_dir / RESULTS, dumps(results))  # last: a folder without it is not a run yet (scan)
        write_index(root)
    return run_dir


def write_index(root: Path) -> Path:
    """Regenerate ``root/index.html`` from every stored run and session (under the root's lock)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        path = root / REPORT
        atomic_write(path, render_index(*scan(root), skipped=skips(sessions(root))))
    return path


def write_session(root: Path, session: dict) -> Path:
    """Store a pytest session's record (``{created, finished, command, ran, skipped, errors}``: what it ran, what
    it skipped and why) as ``root/sessions/<stamp>-<random>.json``; the history and the card list its skips."""
    folder = Path(root) / SESSIONS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_stamp()}-{_token()}.json"
    atomic_write(path, dumps(session))
    return path


def sessions(root: Path) -> list[dict]:
    """Every readable session record under ``root/sessions``, newest first (``_file``: its name)."""
    folder = Path(root) / SESSIONS
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = read_results(path)
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping unreadable session record {path.name}: {exc}", RuntimeWarning, stacklevel=2)
            continue
        out.append({**data, "_file": path.name})
    return sorted(out, key=lambda s: (str(s.get("created") or ""), s["_file"]), reverse=True)


def skips(records: list[dict]) -> list[dict]:
    """The skipped cases of session records, each ``{id, case, system, device, dtype, reason, created, session}``."""
    return [{**k, "created": s.get("created"), "session": s.get("_file")} for s in records
            for k in s.get("skipped") or [] if isinstance(k, dict)]


def _unusable(path: Path) -> str | None:
    """Why ``path`` cannot become a folder we write into (None when it can): it, or its nearest existing
    ancestor, must be a writable folder."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():
            return f"{probe} is a broken link"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder" if probe == path else f"{probe} is a file, so {path} cannot be made"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable" + ("" if probe == path else f" ({path} cannot be made)")
    return None


def check_root(root: Path) -> str | None:
    """Why ``root`` cannot be a report root (None when it can): checked before a run starts, so a bad path costs
    one line, not a run."""
    root = Path(root)
    why = _unusable(root)
    if why is None and (root / RUNS).exists() and not (root / RUNS).is_dir():
        why = f"{root / RUNS} is a file, not a folder"
    if why is None and (root / REPORT).is_dir():
        why = f"{root / REPORT} is a folder, not a page"
    return why


def check_out(out: Path, names: tuple[str, ...] = (RESULTS, REPORT)) -> str | None:
    """Why ``out`` cannot take a report written with ``write_to`` (None when it can): a file, unwritable, or it
    already holds one of ``names`` (a report is never overwritten)."""
    out = Path(out)
    why = _unusable(out)
    if why is None:
        taken = [n for n in names if (out / n).exists()]
        if taken:
            why = f"{out / taken[0]} already exists; refusing to overwrite an earlier report"
    return why


def write_to(results: dict, out_dir: Path, previous: dict | None = None) -> Path:
    """Write ``results.json`` and ``index.html`` into exactly ``out_dir`` (the CLI's ``--out DIR``).

    Refuses with FileExistsError when ``out_dir`` already holds a ``results.json`` or ``index.html``, so an
    earlier report is never overwritten. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS, REPORT):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir / name} already exists; refusing to overwrite an earlier report")
    results = _public(results)
    page = render_run(results, previous)
    with uninterrupted():
        _create_new(out_dir / RESULTS, dumps(results))  # claims the directory; a racing writer fails here
        atomic_write(out_dir / REPORT, page)
    return out_dir


def read_results(path: Path) -> dict:
    """Load one ``results.json`` (raises on unreadable or non-object JSON)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level is {type(data).__name__}, not an object")
    return data


def run_dirs(root: Path) -> list[Path]:
    runs = Path(root) / RUNS
    if not runs.is_dir():
        return []
    return sorted(d for d in runs.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan(root: Path) -> tuple[list[dict], list[dict]]:
    """``(runs, corrupt)`` under ``root/runs``: every readable run, newest first (its results plus
    ``_run = {id, dir, href}``, ``href`` relative to ``root``), and every folder whose ``results.json``
    exists but cannot be read (``{id, dir, href, error}``, ``href`` to that file). A folder without
    ``results.json`` is a run still being written by another process and is in neither list.
    """
    runs, corrupt = [], []
    for d in run_dirs(root):
        path = d / RESULTS
        if not path.exists():
            continue
        try:
            data = read_results(path)
        except (OSError, ValueError) as exc:
            corrupt.append({**_run_meta(d), "href": f"{RUNS}/{d.name}/{RESULTS}",
                            "error": f"{type(exc).__name__}: {exc}"})
            continue
        data["_run"] = _run_meta(d)
        runs.append(data)
    runs.sort(key=lambda r: (S.parse_time(r.get("created")) or datetime.min.replace(tzinfo=timezone.utc),
                             r["_run"]["id"]), reverse=True)
    return runs, corrupt


def corrupt_runs(root: Path) -> list[dict]:
    """Run folders whose ``results.json`` cannot be read (see ``scan``): the history lists them as corrupt,
    since a run that vanished from the history would hide a failure."""
    return scan(root)[1]


def load_runs(root: Path, warn: bool = True) -> list[dict]:
    """Every readable run under ``root/runs``, newest first (see ``scan``); unreadable ones are skipped, with
    a warning unless ``warn`` is False."""
    runs, corrupt = scan(root)
    if warn:
        for c in corrupt:
            warnings.warn(f"skipping unreadable run {c['id']}: {c['error']}", RuntimeWarning, stacklevel=2)
    return runs


# ------------------------------------------------------------------------------------------------ tables


def results_frame(results: dict):
    """The module rows of one run as a ``pandas.DataFrame`` (one row per module and mode)."""
    import pandas as pd

    cols = ["name", "megatron_name", "mode", "layer", "layer_type", "group", "cosine", "rel_l2", "max_abs",
            "gate_metric", "gate_max", "floor", "ratio", "passed"]
    rows = []
    for r in S.modules(results):
        gate = r.get("gate") if isinstance(r.get("gate"), dict) else {}
        layer = S.layer_of(r)
        rows.append({
            "name": r.get("name"), "megatron_name": r.get("megatron_name"), "mode": r.get("mode"),
            "layer": layer, "layer_type": S.layer_type(results, layer) if S.group_of(r) == "text" else None,
            "group": S.group_of(r), "cosine": S.num(r.get("cosine")), "rel_l2": S.num(r.get("rel_l2")),
            "max_abs": S.num(r.get("max_abs")), "gate_metric": gate.get("metric"), "gate_max": S.num(gate.get("max")),
            "floor": S.num(r.get("floor")), "ratio": S.num(r.get("ratio")), "passed": r.get("passed"),
        })
    frame = pd.DataFrame(rows, columns=cols)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def runs_frame(root: Path):
    """One row per stored run (newest first): verdict, key metrics, first divergence, where it lives."""
    import pandas as pd

    cols = ["id", "created", "case", "device", "dtype", "passed", "first_divergence", "logits_cosine",
            "logits_rel_l2", "logits_kl_mean", "logits_kl_max", "worst_module_rel_l2", "modules", "modules_failed",
            "roundtrip_tensors", "roundtrip_bit_exact", "git_commit", "dir"]
    rows = []
    for r in load_runs(root):
        lg = S.logits(r)
        rt = r.get("roundtrip") if isinstance(r.get("roundtrip"), dict) else {}
        n_ok, n = S.module_counts(r)
        rows.append({
            "id": r["_run"]["id"], "created": S.parse_time(r.get("created")), "case": r.get("case"),
            "device": r.get("device"), "dtype": r.get("dtype"), "passed": r.get("passed"),
            "first_divergence": (r.get("summary") or {}).get("first_divergence"),
            "logits_cosine": S.num(lg.get("cosine")), "logits_rel_l2": S.num(lg.get("rel_l2")),
            "logits_kl_mean": S.num(lg.get("kl_mean")), "logits_kl_max": S.num(lg.get("kl_max")),
            "worst_module_rel_l2": S.worst_module_rel_l2(r), "modules": n,
            "modules_failed": sum(1 for m in S.modules(r) if m.get("passed") is False),
            "roundtrip_tensors": rt.get("tensors"), "roundtrip_bit_exact": rt.get("bit_exact"),
            "git_commit": (r.get("env") or {}).get("git_commit"), "dir": r["_run"]["dir"],
        })
    return pd.DataFrame(rows, columns=cols)
