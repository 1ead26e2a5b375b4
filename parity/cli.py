"""``python -m parity``: run a case, list cases, re-render reports.

    python -m parity run --case NAME [--device cpu|cuda] [--dtype float32|bfloat16] [--checkpoint DIR]
                         [--out DIR | --reports DIR] [--seed N] [--progress] [--system NAME[,NAME...]] [--verbose]
    python -m parity cases
    python -m parity report [--dir DIR]
    python -m parity card [--dir DIR] [--since TIME] [--junit FILE] [--out FILE] [--fail-on-regression]

A run prints one line per system under test: verdict, first divergence, regressions against the previous run,
report and history. Several systems (``--system parity,megatron-bridge``) run against one HF reference, built
once; with ``--out DIR`` each system's report is in ``DIR/<system>/`` and ``DIR/index.html`` shows them side by
side.
Third-party notices (Transformer Engine/Apex absent, deprecations) go into the report; ``--verbose`` prints
them too.

Exit codes: 0 = parity holds, 1 = parity fails (the report is still written), 2 = bad input or usage (one
line ``parity: error: ...`` on stderr, no traceback; output locations are checked before anything is built),
3 = internal error (a bug: traceback on stderr), 130 = interrupted (Ctrl-C at any moment: ``python -m parity``
exits at once, or once the report being written is whole; ``parity.interrupts``). ``card`` has its own:
0 pass, 1 failure, 2 no case ran (or bad usage), 5 regression with ``--fail-on-regression``.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn, Sequence

from parity.engine.launch import execute_systems, resolve_device
from parity.errors import UserError

PROG = "parity"
ENV_REPORTS_DIR = "PARITY_REPORTS_DIR"
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line: ``parity: error: MESSAGE (see python -m parity --help)``."""

    def error(self, message: str) -> NoReturn:
        help_cmd = "python -m parity" + self.prog[len(PROG):] + " --help"
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {help_cmd})\n")


def default_reports_dir() -> Path:
    return Path(os.environ.get(ENV_REPORTS_DIR) or "reports")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Module-by-module parity of a Megatron-core Gemma 4 against HF.")
    sub = parser.add_subparsers(dest="command", metavar="{run,cases,report,card,bench}")

    run = sub.add_parser("run", help="run one case and write its report",
                         description="Run one case; exit 0 when parity holds, 1 when it fails, 2 on bad input.")
    run.add_argument("--case", required=True, help="case name (see `python -m parity cases`) or path to a .toml")
    run.add_argument("--device", choices=("cpu", "cuda"),
                     help="default: cuda when available and the case allows it, else cpu")
    run.add_argument("--dtype", choices=("float32", "bfloat16"), help="override the case's dtype")
    run.add_argument("--checkpoint", metavar="DIR",
                     help="local HF checkpoint folder: replaces the case's model (inputs and gates stay)")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", type=Path,
                       help="write DIR/results.json and DIR/index.html (never overwrites)")
    where.add_argument("--reports", metavar="DIR", type=Path, default=None,
                       help=f"report root: a new run under DIR/runs/ and DIR/index.html updated "
                            f"(default: ${ENV_REPORTS_DIR} or reports)")
    run.add_argument("--seed", type=int, help="override the case's seed")
    run.add_argument("--progress", action="store_true", help="print each phase and its time on stderr")
    run.add_argument("--system", default=None,
                     help="the Megatron implementation(s) under test, comma-separated: several run against one HF "
                          "reference (default: the case's [system] name, else parity)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also print the third-party notices collected during the run (they are in the report)")

    sub.add_parser("cases", help="list the case names", description="List the cases, one per line.")

    report = sub.add_parser("report", help="re-render stored reports",
                            description="Rebuild every run page and the history page from the stored results.")
    report.add_argument("--dir", type=Path, default=None,
                        help=f"report root (default: ${ENV_REPORTS_DIR} or reports)")
    from parity.report.card import add_arguments as card_arguments

    card = sub.add_parser("card", help="export a verification card (YAML) of a report root",
                          description="Versions, commands, per-check results, round-trip counts and regressions "
                                      "of the runs in a report root, as YAML; exit 1 on a failure (or regression).")
    card_arguments(card)
    bench = sub.add_parser("bench", help="time each phase of a case and record it under bench/",
                           description="Run a case, time every phase and peak memory, write bench/<case>-<device>-<dtype>.json.")
    bench.add_argument("--case", required=True, help="case name or path to a .toml")
    bench.add_argument("--device", choices=("cpu", "cuda"))
    bench.add_argument("--dtype", choices=("float32", "bfloat16"))
    bench.add_argument("--out", metavar="DIR", type=Path, default=Path("bench"), help="where the record goes (default: bench)")
    bench.add_argument("--progress", action="store_true")
    bench.add_argument("--system", default=None,
                       help="the Megatron implementation(s) under test, comma-separated: several against one HF "
                            "reference (default: the case's [system] name, else parity)")
    bench.add_argument("--repeat", type=int, default=1, metavar="N",
                       help="run the case N times in one process; the record is the last run's, with every wall "
                            "(a fresh machine's first run can be slower in every phase)")
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from parity.bench import bench
    from parity.cases import load_case, system_for
    from parity.report.store import check_out

    case = load_case(args.case)
    systems = systems_for(case, args.system, system_for)
    why = check_out(args.out, names=())  # the record's folder, before anything is built
    if why is not None:
        raise UserError(f"--out {args.out}: {why}")
    if args.repeat < 1:
        raise UserError(f"--repeat {args.repeat}: at least 1")
    device = resolve_device(case, args.device, None)
    path = bench(case, device=device, dtype=args.dtype, out_dir=args.out, progress=args.progress, systems=systems,
                 repeat=args.repeat)
    print(f"benchmark record: {path}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "cases": cmd_cases, "report": cmd_report, "card": cmd_card, "bench": cmd_bench}
    if args.command is None:
        return _usage_error("choose a command: run, cases, report, card or bench (see python -m parity --help)")
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as e:  # noqa: BLE001 - sorted into user errors and bugs below
        message = user_error_message(e)
        if message is None:
            if isinstance(e, SystemExit):
                raise
            traceback.print_exc()
            print(f"{PROG}: internal error (a bug, not a parity verdict): {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_INTERNAL
        return _usage_error(message)


def _usage_error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def user_error_message(e: BaseException) -> str | None:
    """One line for an error the user caused (bad case, path, checkpoint, device, memory), else None."""
    if isinstance(e, UserError):
        return _one_line(str(e))
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return "out of memory: " + _one_line(first, 240)
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        what = e.strerror or type(e).__name__
        return _one_line(f"{what}: {e.filename}" if e.filename else str(e))
    # (a bad checkpoint folder, parity.hf_checkpoint.CheckpointError, is a UserError: handled above)
    for module, name in (("parity.config", "UnsupportedConfig"),):
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod else None
        if cls is not None and isinstance(e, cls):
            return _one_line(str(e))
    return None


# ---------------------------------------------------------------------------------------------------
# Commands

def cmd_cases(args: argparse.Namespace) -> int:
    from parity.cases import list_cases

    cases = list_cases()
    width = max((len(c.name) for c in cases), default=0)
    for c in cases:
        print(f"{c.name:<{width}}  {c.description}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    root = args.dir or default_reports_dir()
    if not root.is_dir():
        raise UserError(f"no report directory {root}" if not root.exists() else f"{root} is not a directory")
    from parity.report.cli import rerender

    n = rerender(root)
    print(f"re-rendered {n} run{'s' if n != 1 else ''}; history: {root / 'index.html'}")
    return EXIT_OK


def cmd_card(args: argparse.Namespace) -> int:
    from parity.report.card import run

    return run(args)


def cmd_run(args: argparse.Namespace) -> int:
    from parity.cases import checkpoint_for, load_case, model_record, system_for

    case = load_case(args.case)
    systems = systems_for(case, args.system, system_for)
    several = len(systems) > 1
    reports = args.reports or default_reports_dir()
    check_outputs(args.out, reports, systems)  # before anything is built: a bad path costs one line, not a run
    checkpoint = checkpoint_for(case, args.checkpoint)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.exists():
            source = "--checkpoint" if args.checkpoint else f"${case.model.checkpoint_env}"
            raise UserError(f"checkpoint folder {checkpoint} does not exist (from {source})")
        if not path.is_dir():
            raise UserError(f"checkpoint {checkpoint} is not a folder (expected a local HF checkpoint folder)")
        if not (path / "config.json").is_file():  # before the heavy imports; the rest is checked from headers
            raise UserError(f"{path / 'config.json'}: missing (not an HF checkpoint folder)")
    device = resolve_device(case, args.device, checkpoint)
    from parity.interrupts import uninterrupted
    from parity.provenance import third_party_notices

    notices: list[str] = []
    try:
        with third_party_notices(notices):
            runs = execute_systems(case, device=device, dtype=args.dtype, checkpoint=checkpoint, seed=args.seed,
                           progress=args.progress, systems=systems)
    finally:
        if args.verbose:
            for n in notices:
                print(f"notice: {n}", file=sys.stderr)
    written, lines = [], []
    with uninterrupted():  # Ctrl-C now waits until every report of this run is whole
        for results in runs:
            if isinstance(results.get("env"), dict):
                results["env"]["warnings"] = notices
            results.setdefault("model", model_record(case, checkpoint))
            out = None if args.out is None else (args.out / results["system"]["name"] if several else args.out)
            report = write_report(results, out=out, reports=reports)
            written.append(report)
            lines.append(summary_text(results, report, None if args.out is not None else reports / "index.html"))
        if several:
            lines.append(f"systems side by side: {write_side_by_side(case.name, runs, written, args.out, reports)}")
    print("\n".join(lines))
    return EXIT_OK if all(r.get("passed") for r in runs) else EXIT_FAIL


def check_outputs(out: Path | None, reports: Path, systems: list[str]) -> None:
    """Refuse, in one line, an output location a run could not write: ``--out DIR`` (each system's folder and
    the side-by-side page with several) or else the report root (``--reports`` / $PARITY_REPORTS_DIR)."""
    from parity.report.store import RESULTS, REPORT, check_out, check_root

    if out is None:
        why = check_root(reports)
        if why is not None:
            raise UserError(f"report root {reports}: {why}")
        return
    several = len(systems) > 1
    for folder, names in ([(out / s, (RESULTS, REPORT)) for s in systems] + [(out, (REPORT,))] if several
                          else [(out, (RESULTS, REPORT))]):
        why = check_out(folder, names)
        if why is not None:
            raise UserError(f"--out {folder}: {why}" if "already exists" not in why else why)


def systems_for(case, flag: str | None, system_for) -> list[str]:
    """The systems under test of a run: ``--system a,b`` (each known, none twice), else the case's own."""
    if flag is None:
        return [system_for(case, None)]
    names = [n.strip() for n in flag.split(",")]
    if "" in names:
        raise UserError(f"--system {flag!r}: an empty system name")
    if len(set(names)) != len(names):
        raise UserError(f"--system {flag!r}: a system named twice")
    return [system_for(case, n) for n in names]


def write_side_by_side(case: str, runs: list[dict], reports: list[Path], out: Path | None, root: Path) -> Path:
    """The page showing several systems' runs of one case side by side: ``out/index.html`` with ``--out``, else
    ``root/systems/<the first run's id>/index.html`` beside the history."""
    import os

    from parity.report.systems import write_systems

    where = out if out is not None else root / "systems" / reports[0].parent.name
    entries = [(r["system"]["name"], r, os.path.relpath(p, where)) for r, p in zip(runs, reports)]
    return Path(write_systems(where, case, entries))


def write_report(results: dict, *, out: Path | None = None, reports: Path | None = None) -> Path:
    """Write the run's report; returns the path of its ``index.html``."""
    from parity.report.store import write_run, write_to

    if out is not None:
        try:
            return Path(write_to(results, out)) / "index.html"
        except FileExistsError as e:
            raise UserError(_one_line(str(e))) from None
    return Path(write_run(results, reports or default_reports_dir())) / "index.html"


# ---------------------------------------------------------------------------------------------------
# The one-line summary (parity.report.oneline)

def divergence_text(results: dict) -> str:
    """``model.layers.3.self_attn = megatron ... (end_to_end; rel_l2 0.031 > gate 1e-05)`` or ``none``."""
    from parity.report.oneline import divergence

    return divergence(results)


def summary_text(results: dict, report: Path | str | None = None, history: Path | str | None = None) -> str:
    """One line: verdict, first divergence, regressions, report and history paths."""
    from parity.report.oneline import summary_line

    return summary_line(results, report, history)


if __name__ == "__main__":  # pragma: no cover
    from parity.interrupts import install

    install()
    sys.exit(main())
