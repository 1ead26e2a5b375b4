"""Reports of parity runs: ``results.json`` plus a self-contained HTML page per run, and a run history.

- ``store``: ``write_run`` (a fresh ``reports/runs/<stamp>-<case>-<rand>/``, with the regression record and
  the since-when links), ``write_to`` (the CLI's ``--out DIR``, never overwrites), ``scan`` / ``load_runs``
  (readable and corrupt runs), ``results_frame``, ``runs_frame``.
- ``html``: ``render_run(results, previous, links)``, one run's page; ``heatmap``: its layer × module grid.
- ``history``: ``compare(current, previous)`` (the one regression rule, ``RULE``), ``run_links`` (previous,
  last pass, failing since) and ``render_index(runs, corrupt)``.
- ``oneline``: the one summary line of a run (CLI, pytest plugin); ``card``: the verification card (YAML).
- ``cli``: ``rerender(root)``, rebuild every page from the stored results.
"""
from parity.report.history import compare, find_previous, render_index, run_links
from parity.report.html import render_run
from parity.report.store import load_runs, results_frame, runs_frame, scan, write_index, write_run, write_to

__all__ = ["compare", "find_previous", "load_runs", "render_index", "render_run", "results_frame", "run_links",
           "runs_frame", "scan", "write_index", "write_run", "write_to"]
