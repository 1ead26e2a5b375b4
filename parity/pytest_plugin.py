"""pytest plugin: the parity suites as parametrised tests over cases (registered by the root ``conftest.py``).

Options are the interface::

    --parity-device cpu|cuda        default: cuda when available and the case allows it, else cpu
    --parity-dtype float32|bfloat16 override every case's dtype (ids then say so: ``...-as-bf16``)
    --parity-checkpoint DIR         checkpoint for checkpoint cases (default: the case's env, GEMMA4_CHECKPOINT)
    --parity-reports DIR            report root (default: $PARITY_REPORTS_DIR or reports/)
    --parity-case NAME              run only these cases (repeatable)
    --parity-progress               print the engine's phases (use with -s)
    --parity-system NAME[,NAME]     the Megatron implementation(s) under test (default parity; ids then carry
                                    it); several run against one HF reference, built once per case

A test that takes ``parity_target`` is parametrised over the cases, one id per case:
``test_logits[gemma4-text-tiny]`` (the check is the test's name, so ``-k logits`` selects a check and
``-k tiny`` a case). The expensive run is cached per session and keyed by what makes runs differ (case,
device, dtype, checkpoint, seed), so the checks of one case share ONE engine run; each run is written at once
with ``parity.report.store.write_run`` (a fresh run folder, never overwritten). Third-party warnings printed
during a run are collected into its report (``env.warnings``); ``-v`` lists them in the summary.

pytest-xdist: ``-n N`` without an explicit ``--dist`` schedules by case (``CaseScheduling``: the checks of
one case go to one worker, the tests of one file with one parameter id too -- a module-scoped parametrized
fixture is then built once --, other tests are spread one by one), so a case runs once and node ids -- hence
JUnit names -- are the same as in a serial run (``--dist loadgroup`` would append ``@<group>``). Workers
write their runs into the shared report root; the controller collects each case's verdict from the test
reports (user properties, which also land in ``--junitxml``; paths there are relative to the report root),
regenerates the history page once in ``pytest_sessionfinish`` and prints one line per case in a terminal
summary section.

Skips are results: a case collected but not run (needs CUDA, a checkpoint, more GPUs, another system) is a
``SKIP`` line of that section with its reason, a session record in the report root (``store.write_session``:
what ran, what was skipped and why, what raised) that the history page and the verification card list, and
``no case ran: ...`` when nothing ran at all. The report root is checked when pytest starts (a usage error).
"""
from __future__ import annotations

import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from parity import registry
from parity.cases import Case, checkpoint_for, default_device, list_cases, load_case, run_id, system_for, unmet_requirement
from parity.errors import UserError

CHECKS = ("logits", "modules", "roundtrip", "router")
MARKERS = {
    "cpu": "runs on CPU (tiny cases)",
    "gpu": "needs one CUDA GPU",
    "multigpu": "needs several CUDA GPUs (launched with torchrun)",
    "slow": "long-running",
    "checkpoint": "needs a real Gemma 4 checkpoint (--parity-checkpoint or GEMMA4_CHECKPOINT)",
}
ENV_REPORTS_DIR = "PARITY_REPORTS_DIR"
_STATE = pytest.StashKey["_State"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("parity", "Gemma 4 parity (Megatron-core vs Hugging Face)")
    group.addoption("--parity-device", choices=("cpu", "cuda"), default=None,
                    help="device of every case (default: cuda when available and allowed, else cpu)")
    group.addoption("--parity-dtype", choices=("float32", "bfloat16"), default=None,
                    help="override every case's dtype")
    group.addoption("--parity-checkpoint", metavar="DIR", default=None,
                    help="local HF checkpoint folder for checkpoint cases (default: $GEMMA4_CHECKPOINT)")
    group.addoption("--parity-reports", metavar="DIR", default=None,
                    help=f"report root (default: ${ENV_REPORTS_DIR} or reports)")
    group.addoption("--parity-case", metavar="NAME", action="append", default=[],
                    help="run only this case (repeatable)")
    group.addoption("--parity-progress", action="store_true", default=False,
                    help="print the engine's phases on stderr (see them with -s)")
    group.addoption("--parity-system", metavar="NAME", default=None,
                    help="the Megatron implementation(s) under test, comma-separated (default: each case's [system] "
                         "name, else parity; e.g. megatron-bridge or parity,megatron-bridge: one HF build for both)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """``-n N`` without ``--dist``: schedule by case (``CaseScheduling``) so the checks of a case share a worker."""
    opt = config.option
    if getattr(opt, "numprocesses", None) and getattr(opt, "dist", None) == "no" and not getattr(opt, "distload", False):
        opt.dist = "loadscope"  # xdist then asks pytest_xdist_make_scheduler, which answers CaseScheduling
        opt.parity_by_case = True


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if not getattr(config.option, "parity_by_case", False):
        return None
    from xdist.scheduler import LoadScopeScheduling

    groups = {t.id: t.group for t in config.stash[_STATE].all_targets()}

    class CaseScheduling(LoadScopeScheduling):
        """One work unit per case (all its checks, of every system under test); node ids untouched."""

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid, groups)

    return CaseScheduling(config, log)


def work_unit(nodeid: str, groups: dict[str, str]) -> str:
    """The xdist work unit of a test under ``-n N``: a case's checks share one (``groups``: case id -> its group);
    the tests of one file with the same parameter id share one too (a module-scoped parametrized fixture -- a gloo
    world, a system's run -- is then built once, not once per worker); every other test is a unit of its own."""
    m = re.search(r"\[([^\[\]]+)\]$", nodeid)
    if m is None:
        return nodeid
    if m.group(1) in groups:
        return f"parity-case:{groups[m.group(1)]}"
    return f"{nodeid.split('::')[0]}[{m.group(1)}]"


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    state = _State.from_config(config)
    config.stash[_STATE] = state
    worker = getattr(config, "workerinput", None)
    if worker is None:
        dist = getattr(config.option, "dist", "no")
        if dist not in ("no", "loadgroup") and not getattr(config.option, "parity_by_case", False):
            config.issue_config_time_warning(pytest.PytestConfigWarning(
                f"parity: --dist {dist} may split the checks of one case over several workers, each of which then "
                f"reruns the case; leave --dist out (-n N alone schedules by case)"), stacklevel=2)
        config.pluginmanager.register(_Controller(state), "parity-controller")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist: tell each worker the report root and the distribution mode
    node.workerinput["parity_reports"] = str(node.config.stash[_STATE].reports)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[_STATE]
    return [f"parity: reports -> {state.reports}; device {state.device or 'auto'}; "
            f"dtype {state.dtype or 'per case'}"]


# ---------------------------------------------------------------------------------------------------
# Targets: one case as it runs here (device, dtype, checkpoint), with why it cannot run, if it cannot

@dataclass(frozen=True)
class Target:
    case: Case
    device: str
    dtype: str
    checkpoint: str | None
    seed: int | None
    id: str
    skip: str | None = None
    system: str = "parity"
    group: str = ""  # the run id without the system: targets of one group share one HF reference

    @property
    def key(self) -> tuple:
        return (self.case.name, str(self.case.path), self.device, self.dtype, self.checkpoint, self.seed, self.system)

    def __repr__(self) -> str:  # short, for pytest's output
        return f"Target({self.id}, {self.device}, {self.dtype})"


@dataclass
class _Outcome:
    results: dict | None = None
    report: Path | None = None
    error: BaseException | None = None
    shown: bool = False
    notices: list[str] = field(default_factory=list, repr=False)


@dataclass
class _State:
    reports: Path
    device: str | None
    dtype: str | None
    checkpoint: str | None
    only: tuple[str, ...]
    progress: bool
    systems: tuple[str, ...] | None = None  # explicit --parity-system; None: each case's [system] name
    targets: list[Target] | None = None
    runs: dict[tuple, _Outcome] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "_State":
        opt = config.getoption
        worker = getattr(config, "workerinput", None) or {}
        reports = worker.get("parity_reports") or opt("parity_reports") or os.environ.get(ENV_REPORTS_DIR) or "reports"
        reports = Path(config.invocation_params.dir, reports).resolve()
        from parity.report.store import check_root

        why = check_root(reports)  # before any case is collected, let alone run
        if why is not None:
            raise pytest.UsageError(f"--parity-reports {reports}: {why}")
        checkpoint = opt("parity_checkpoint")
        if checkpoint and not Path(checkpoint).is_dir():
            raise pytest.UsageError(f"--parity-checkpoint {checkpoint}: no such folder")
        if checkpoint and not (Path(checkpoint) / "config.json").is_file():  # before any heavy import
            raise pytest.UsageError(f"--parity-checkpoint {checkpoint}: no config.json (not an HF checkpoint folder)")
        only = tuple(dict.fromkeys(opt("parity_case") or ()))
        for name in only:
            try:
                load_case(name)
            except UserError as e:
                raise pytest.UsageError(f"--parity-case: {e}") from None
        flag = opt("parity_system")
        from parity.registry import SYSTEMS, known

        systems = None if flag is None else tuple(dict.fromkeys(n.strip() for n in flag.split(",")))
        for system in systems or ():
            if system not in SYSTEMS:
                raise pytest.UsageError(f"--parity-system: unknown system {system!r} (known: {known()})")
        return cls(reports=reports, device=opt("parity_device"), dtype=opt("parity_dtype"), checkpoint=checkpoint,
                   only=only, progress=bool(opt("parity_progress")), systems=systems)

    def all_targets(self) -> list[Target]:
        if self.targets is None:
            cases = [load_case(n) for n in self.only] if self.only else list_cases()
            self.targets = _unique_ids([self.target(c, s) for c in cases for s in (self.systems or (None,))])
        return self.targets

    def target(self, case: Case, explicit: str | None = None) -> Target:
        cuda, count = _cuda() if self.device != "cpu" else (False, 0)  # --parity-device cpu: no torch import
        device = self.device or default_device(case, cuda)
        dtype = self.dtype or case.dtype
        checkpoint = checkpoint_for(case, self.checkpoint) if case.needs_checkpoint else None
        why = unmet_requirement(case, device=device, checkpoint=checkpoint, cuda_available=cuda, device_count=count,
                                checkpoint_hint="--parity-checkpoint DIR")
        if why is None and case.world_size > 1 and importlib.util.find_spec("parity.engine.distributed") is None:
            why = f"multi-GPU launch not available: parity.engine.distributed is missing (case {case.name})"
        system = system_for(case, explicit)
        if why is None:  # a package the system needs for this case does not import here (the registry says which)
            why = registry.unavailable(system, case)
        run = run_id(case, self.dtype)
        return Target(case=case, device=device, dtype=dtype, checkpoint=checkpoint, seed=None,
                      id=run if system == "parity" else f"{run}@{system}", skip=why, system=system, group=run)

    def run(self, target: Target) -> _Outcome:
        """The one engine run of ``target`` in this process (cached, errors included). The targets of its group
        (the same case run against other systems) that are still to run share it: one HF reference for all."""
        if target.key in self.runs:
            return self.runs[target.key]
        from parity.engine.launch import execute_systems
        from parity.provenance import third_party_notices

        ahead = [target] + [t for t in self.all_targets() if t.group == target.group and t.key != target.key
                            and t.skip is None and t.key not in self.runs and t.key[:-1] == target.key[:-1]]
        outcomes = {t.key: _Outcome() for t in ahead}
        notices: list[str] = []
        try:
            with third_party_notices(notices):
                runs = execute_systems(target.case, device=target.device, dtype=target.dtype,
                                       checkpoint=target.checkpoint, seed=target.seed, progress=self.progress,
                                       systems=[t.system for t in ahead])
            for t, results in zip(ahead, runs):
                outcomes[t.key].results = results
        except Exception as e:  # cached: the other checks of these targets report it without rerunning
            for o in outcomes.values():
                o.error = e
        from parity.cases import model_record

        for t in ahead:
            outcome = outcomes[t.key]
            outcome.notices = list(notices)
            if outcome.results is not None:
                outcome.results.setdefault("model", model_record(t.case, t.checkpoint))
                env = outcome.results.setdefault("env", {})
                if isinstance(env, dict):
                    env["warnings"] = list(notices)
                try:
                    from parity.report.store import write_run

                    outcome.report = Path(write_run(outcome.results, self.reports)) / "index.html"
                except Exception as e:  # noqa: BLE001 - the verdicts stand; the missing report is a warning
                    warnings.warn(pytest.PytestWarning(f"parity: could not write the report of {t.id}: "
                                                       f"{type(e).__name__}: {e}"))
            self.runs[t.key] = outcome
        return self.runs[target.key]


def _cuda() -> tuple[bool, int]:
    import torch

    available = torch.cuda.is_available()
    return available, (torch.cuda.device_count() if available else 0)


def _unique_ids(targets: list[Target]) -> list[Target]:
    seen: dict[str, int] = {}
    out = []
    for t in targets:
        n = seen.get(t.id, 0)
        seen[t.id] = n + 1
        out.append(t if n == 0 else Target(**{**t.__dict__, "id": f"{t.id}-{n}"}))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "parity_target" not in metafunc.fixturenames:
        return
    check = metafunc.function.__name__.removeprefix("test_")
    params = []
    for t in metafunc.config.stash[_STATE].all_targets():
        marks = [getattr(pytest.mark, m) for m in t.case.markers] + [pytest.mark.xdist_group(t.group)]
        if t.skip:
            marks.append(pytest.mark.skip(reason=t.skip))
        elif check == "router" and t.case.dense:
            marks.append(pytest.mark.skip(reason=f"dense model: no router (case {t.case.name})"))
        elif check in t.case.expected_failures and t.system == t.case.system.name:  # a known finding: must fail
            marks.append(pytest.mark.xfail(reason=t.case.expected_failures[check], strict=True))
        params.append(pytest.param(t, id=t.id, marks=marks))
    metafunc.parametrize("parity_target", params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep the checks of one case together (in their file order), so a case's run is reused at once; name the
    target in each item's user properties, so that a skipped check reports which case it skipped and why."""
    slots = [i for i, item in enumerate(items) if _target_of(item) is not None]
    if not slots:
        return
    for i in slots:
        t, item = _target_of(items[i]), items[i]
        item.user_properties += [("parity_id", t.id), ("case", t.case.name), ("system", t.system),
                                 ("device", t.device), ("dtype", t.dtype),
                                 ("check", getattr(item, "originalname", item.name).removeprefix("test_"))]
    order = {t.id: n for n, t in enumerate(config.stash[_STATE].all_targets())}
    group = sorted((items[i] for i in slots), key=lambda it: order.get(_target_of(it).id, 0))
    for i, item in zip(slots, group):
        items[i] = item


def _target_of(item: pytest.Item) -> Target | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("parity_target") if callspec is not None else None


# ---------------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="session")
def parity_runs(pytestconfig: pytest.Config) -> _State:
    """The session's run cache (one engine run per case, device, dtype, checkpoint and seed)."""
    return pytestconfig.stash[_STATE]


@pytest.fixture
def parity_run(request: pytest.FixtureRequest, parity_runs: _State, parity_target: Target) -> "ParityRun":
    """The results of ``parity_target``'s run; the first test of a case runs it, the others reuse it."""
    outcome = parity_runs.run(parity_target)
    check = request.node.originalname.removeprefix("test_")
    props = request.node.user_properties  # the target's identity is there from collection on
    if outcome.error is not None:
        e = outcome.error
        props.append(("error", f"{type(e).__name__}: {e}"))
        if isinstance(e, UserError) or outcome.shown:
            pytest.fail(f"run of {parity_target.id} failed: {type(e).__name__}: {e}", pytrace=False)
        outcome.shown = True
        raise e
    run = ParityRun(parity_target, outcome.results, outcome.report)
    summary = outcome.results.get("summary") or {}
    from parity.report.oneline import stored_regressions

    record = stored_regressions(outcome.report) or {}
    props += [("passed", bool(outcome.results.get("passed"))), ("check_passed", run.passed(check)),
              ("first_divergence", summary.get("first_divergence")),
              ("report", _under(outcome.report, parity_runs.reports) if outcome.report else None),
              ("regressions", record.get("count") if record.get("previous") else None),
              ("notices", "\n".join(outcome.notices))]
    return run


# ---------------------------------------------------------------------------------------------------
# Verdicts and the messages that explain them

def _num(x: Any) -> str:
    from parity.report.oneline import fmt_num

    return fmt_num(x)


@dataclass
class ParityRun:
    target: Target
    results: dict
    report: Path | None

    @property
    def where(self) -> str:
        return f"{self.target.id} ({self.target.device}, {self.target.dtype})"

    def passed(self, check: str) -> bool:
        return bool((self.results.get("checks") or {}).get(check, False))

    def require(self, check: str) -> None:
        """Fail the calling test with ``explain(check)`` alone (no assertion rewrite of this object)."""
        if not self.passed(check):
            pytest.fail(self.explain(check), pytrace=False)

    def has_router(self) -> bool:
        return bool(self.results.get("routers")) or any(r.get("kind") == "router" for r in self.modules())

    def modules(self) -> list[dict]:
        return list(self.results.get("modules") or [])

    def explain(self, check: str) -> str:
        """Why ``check`` failed: metric against gate, first divergence, where the report is."""
        checks = self.results.get("checks") or {}
        if check not in checks:
            body = f"the results carry no {check!r} verdict (checks: {', '.join(checks) or 'none'})"
        else:
            body = getattr(self, f"_explain_{check}")()
        from parity.report.oneline import divergence

        tail = f" First divergence: {divergence(self.results)}."
        if self.report:
            tail += f" Report: {self.report}"
        return f"{self.where}: {check} check failed: {body}.{tail}"

    @staticmethod
    def _row(r: dict) -> str:
        gate = r.get("gate") or {}
        metric = gate.get("metric", "rel_l2")
        text = f"{r.get('name')} ({r.get('mode')}) {metric} {_num(r.get(metric))} > gate {_num(gate.get('max'))}"
        if r.get("floor") is not None:
            text += f" [floor {_num(r['floor'])}, ratio {_num(r.get('ratio'))}]"
        if r.get("why") or r.get("detail"):
            text += f" ({r.get('why') or r.get('detail')})"
        return text

    def _failing(self, kinds=None, exclude=()) -> list[dict]:
        return [r for r in self.modules() if not r.get("passed") and r.get("kind") not in exclude
                and (kinds is None or r.get("kind") in kinds)]

    def _explain_logits(self) -> str:
        logits = (self.results.get("summary") or {}).get("logits") or {}
        parts = [self._row(r) for r in self._failing(kinds=("logits",))]
        gates = (self.results.get("gates") or {}).get(self.target.dtype) or {}
        kl_gate = gates.get("kl_max" if self.target.dtype == "float32" else "logits_kl_max")
        kl = logits.get("kl_max")
        if kl_gate is not None and kl is not None and kl > kl_gate:
            parts.append(f"per-token KL max {_num(kl)} > gate {_num(kl_gate)} (mean {_num(logits.get('kl_mean'))})")
        if logits.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {logits['top1_agreement']:.2%}")
        return "; ".join(parts) or "no failing logits row recorded"

    def _explain_modules(self) -> str:
        bad = self._failing(exclude=("router",))
        shown = "; ".join(self._row(r) for r in bad[:8])
        more = f"; ... and {len(bad) - 8} more" if len(bad) > 8 else ""
        return f"{len(bad)} of {len(self.modules())} module comparisons over their gates: {shown}{more}"

    def _explain_roundtrip(self) -> str:
        rt = self.results.get("roundtrip") or {}
        bad = [r for r in rt.get("rows") or [] if not r.get("bit_exact")]
        names = ", ".join(f"{r.get('name')}" + (f" ({r['problem']})" if r.get("problem") else "") for r in bad[:5])
        return (f"{rt.get('bit_exact')} of {rt.get('tensors')} tensors bit-exact after HF -> Megatron -> HF, "
                f"max |diff| {_num(rt.get('max_abs_diff'))}" + (f"; not exact: {names}" if names else ""))

    def _explain_mode_rows(self, check: str, what: str) -> str:
        """The failing rows of the modes whose rows decide ``check`` (modes with rows of their own:
        ``parity.engine.modes``)."""
        from parity.engine.modes import MODES

        rows = {row for m in MODES if m.check == check for row in m.rows}
        bad = [r for r in self.modules() if not r.get("passed") and r.get("mode") in rows]
        return f"{len(bad)} {what} over their gates: " + "; ".join(self._row(r) for r in bad[:8])

    def _explain_gradients(self) -> str:  # the backward mode's rows and the isolated backward's
        return self._explain_mode_rows("gradients", "gradient comparisons")

    def _explain_loss(self) -> str:
        loss = ((self.results.get("train") or {}).get("loss")) or {}
        return (f"HF loss {_num(loss.get('hf'))}, system {_num(loss.get('system'))}: relative difference "
                f"{_num(loss.get('rel_diff'))}, per-token rel-L2 {_num((loss.get('per_token') or {}).get('rel_l2'))} "
                f"> gate {_num(loss.get('gate'))}")

    def _explain_lora(self) -> str:
        lora = self.results.get("lora") or {}
        raised = [f"{f['method']} raised {f['error']}" for f in self.results.get("failures") or []
                  if f.get("phase") in ("lora", "adapters")]
        export = lora.get("export") or {}
        return "; ".join(raised + [self._explain_mode_rows("lora", "adapter export and merge comparisons"),
                                   f"adapter export {export.get('exported')} / {export.get('hf')} tensors, "
                                   f"{export.get('bit_exact')} bit-exact, loads into peft: {lora.get('export_loads')}"])

    def _explain_step(self) -> str:
        return self._explain_mode_rows("step", "parameter updates")

    def _explain_trajectory(self) -> str:
        t = ((self.results.get("train") or {}).get("trajectory")) or {}
        return (f"over {t.get('steps')} steps the largest relative difference of loss or gradient norm is "
                f"{_num(t.get('worst_rel_diff'))} > gate {_num(t.get('gate'))}; HF losses {t.get('hf', {}).get('loss')}, "
                f"system {t.get('system', {}).get('loss')}")

    def _explain_router(self) -> str:
        bad = self._failing(kinds=("router",))
        return (f"{len(bad)} router comparisons fail: " + "; ".join(self._row(r) for r in bad[:8])) if bad else \
            "router verdict false without a failing router row"


# ---------------------------------------------------------------------------------------------------
# The controller (not xdist workers): verdicts per case, the history page, the terminal summary

class _Controller:
    def __init__(self, state: _State):
        self.state = state
        self.cases: dict[str, dict] = {}
        self.started = _now()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties or ())
        pid = props.get("parity_id")
        if pid is None or report.when not in ("setup", "call"):
            return
        entry = self.cases.setdefault(pid, {"checks": {}})
        entry.update({k: props[k] for k in ("case", "system", "device", "dtype", "passed", "first_divergence",
                                            "report", "error", "regressions", "notices") if k in props})
        if report.skipped:
            entry.setdefault("skip", _skip_reason(report))
        if report.when == "call" or report.failed or report.skipped:
            entry["checks"][props.get("check")] = report.outcome

    def _ran(self) -> dict[str, dict]:
        return {pid: e for pid, e in sorted(self.cases.items()) if "passed" in e or e.get("error")}

    def _skipped(self) -> dict[str, dict]:
        """Cases collected but not run: every check of theirs skipped (with the first check's reason)."""
        ran = self._ran()
        return {pid: e for pid, e in sorted(self.cases.items()) if pid not in ran and e["checks"]
                and all(o == "skipped" for o in e["checks"].values())}

    def session(self) -> dict:
        """This session's record (``store.write_session``): what ran, what was skipped and why, what raised."""
        from parity.provenance import command_line

        keys = ("case", "system", "device", "dtype")
        return {"created": self.started, "finished": _now(), "command": command_line(),
                "ran": [{"id": pid, **{k: e.get(k) for k in keys}, "passed": e.get("passed"),
                         "report": e.get("report")} for pid, e in self._ran().items() if not e.get("error")],
                "skipped": [{"id": pid, **{k: e.get(k) for k in keys}, "reason": e.get("skip") or "skipped"}
                            for pid, e in self._skipped().items()],
                "errors": [{"id": pid, "case": e.get("case"), "error": e["error"]}
                           for pid, e in self._ran().items() if e.get("error")]}

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.cases or session.config.option.collectonly:
            return
        try:
            from parity.report.store import write_index, write_session

            write_session(self.state.reports, self.session())
            write_index(self.state.reports)
        except Exception as e:  # noqa: BLE001
            warnings.warn(pytest.PytestWarning(f"parity: could not record the session in {self.state.reports}: {e}"))

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.cases:
            return
        tr = terminalreporter
        tr.section("parity")
        width = max(len(k) for k in self.cases)
        notices: list[str] = []
        skipped = self._skipped()
        for pid, e in self.cases.items():
            if e.get("error"):
                verdict, text = "ERROR", e["error"]
            elif pid in skipped:
                verdict, text = "SKIP", f"not run: {e.get('skip')}"
            elif "passed" not in e:
                continue
            else:
                verdict = "PASS" if e.get("passed") else "FAIL"
                n = e.get("regressions")
                regs = "first run" if n is None else str(n)
                text = f"first divergence: {e.get('first_divergence') or 'none'} · regressions: {regs}"
                if e.get("report"):
                    text += f" · report: {_rel(self.state.reports / e['report'])}"
            tr.write_line(f"{verdict:<5} {pid:<{width}}  {e.get('device')} {e.get('dtype') or '':<8}  {text}")
            notices += [n for n in (e.get("notices") or "").splitlines() if n and n not in notices]
        if skipped and not self._ran():
            from parity.report.oneline import no_case_ran

            tr.write_line(no_case_ran([{"id": pid, "case": e.get("case"), "reason": e.get("skip")}
                                       for pid, e in skipped.items()]), red=True, bold=True)
        if not tr.config.option.collectonly:
            tr.write_line(f"history: {_rel(self.state.reports / 'index.html')}")
        if notices and tr.config.option.verbose > 0:
            tr.write_line(f"third-party notices ({len(notices)}, also in each report's environment section):")
            for n in notices:
                tr.write_line(f"  {n}")
        elif notices:
            tr.write_line(f"{len(notices)} third-party notices (Transformer Engine/Apex absent, deprecations): "
                          f"-v lists them; each report keeps them")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "skipped")
    return text.removeprefix("Skipped: ")


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _under(path: Path, root: Path) -> str:
    """``path`` relative to the report ``root`` (``runs/<id>/index.html``), as JUnit properties carry it."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _rel(path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


__all__ = ["CHECKS", "ParityRun", "Target"]
