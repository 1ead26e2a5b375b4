"""Reports of parity runs: ``results.json`` plus a self-contained HTML page per run, and a run history.

- ``store``: ``write_run`` (a fresh ``reports/runs/<stamp>-<case>-<rand>/``), ``write_to`` (the CLI's
  ``--out DIR``, never overwrites), ``load_runs``, ``results_frame``, ``runs_frame``.
- ``html``: ``render_run(results, previous)``, one run's page.
- ``history``: ``render_index(runs)`` and ``compare(current, previous)`` (regression flags).
- ``cli``: ``rerender(root)``, rebuild every page from the stored results.
"""
from parity.report.history import compare, find_previous, render_index
from parity.report.html import render_run
from parity.report.store import load_runs, results_frame, runs_frame, write_index, write_run, write_to

__all__ = ["compare", "find_previous", "load_runs", "render_index", "render_run", "results_frame", "runs_frame",
           "write_index", "write_run", "write_to"]
