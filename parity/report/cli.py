"""Re-render stored reports from their ``results.json`` (behind ``python -m parity report --dir DIR``).

Reports are derived data: after a change of the renderer, ``rerender`` rebuilds every run's ``index.html``
and the history page from the stored results without rerunning anything. ``results.json`` is never touched.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from parity.report.history import previous_map, run_links
from parity.report.html import render_run
from parity.report.store import REPORT, atomic_write, load_runs, write_index


def rerender(root: Path) -> int:
    """Rewrite ``root/runs/*/index.html`` and ``root/index.html``; returns the number of runs re-rendered.

    Unreadable runs are skipped with a warning (see ``store.load_runs``). A root without runs gets an
    empty history page.
    """
    root = Path(root)
    runs = load_runs(root)
    prev = previous_map(runs)
    for run in runs:
        run_dir = Path(run["_run"]["dir"])
        atomic_write(run_dir / REPORT, render_run(run, prev.get(id(run)), run_links(run, runs)))
    write_index(root)
    return len(runs)


def main(argv: list[str] | None = None) -> int:
    """``python -m parity.report.cli --dir reports``: exit 0 after re-rendering, 2 on a bad directory."""
    parser = argparse.ArgumentParser(prog="parity report", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="reports", type=Path, help="report root (default: reports)")
    args = parser.parse_args(argv)
    if args.dir.exists() and not args.dir.is_dir():
        print(f"error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = rerender(args.dir)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"re-rendered {n} run{'s' if n != 1 else ''} and {args.dir / REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
