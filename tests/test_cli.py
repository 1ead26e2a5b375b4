"""``python -m parity``: listing, exit codes, one-line user errors. No engine run here (the fast ones fake it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity import cli
from parity.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def parity(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True, timeout=120,
                          env=full_env, cwd=cwd or ROOT)


def assert_usage_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("parity: error: "), p.stderr
    assert "Traceback" not in p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------
# Subprocess: the contract as users see it

def test_cases_lists_required_names():
    p = parity("cases")
    assert p.returncode == 0, p.stderr
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    for name in ("gemma4-text-tiny", "gemma4-vlm-tiny", "gemma4-26b-a4b"):
        assert name in names
    line = next(line for line in p.stdout.splitlines() if line.startswith("gemma4-26b-a4b "))
    assert "26B-A4B" in line  # with its description


def test_unknown_case():
    assert_usage_error(parity("run", "--case", "no-such-case"), "unknown case 'no-such-case'", "gemma4-26b-a4b")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_cpu_machine():
    assert_usage_error(parity("run", "--case", "gemma4-text-tiny", "--device", "cuda"), "--device cuda", "no CUDA")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_only_case_on_cpu_machine():
    assert_usage_error(parity("run", "--case", "gemma4-26b-a4b"), "gemma4-26b-a4b", "cuda only")
    assert_usage_error(parity("run", "--case", "gemma4-26b-a4b", "--device", "cpu"), "gemma4-26b-a4b")


def test_gpu_only_case_asked_for_cpu(monkeypatch):
    """Even with a GPU, a GPU-only case refuses --device cpu (in-process, any machine)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    from parity.cases import load_case

    with pytest.raises(UserError, match="runs on cuda only, not on cpu"):
        cli.resolve_device(load_case("gemma4-26b-a4b"), "cpu", None)
    with pytest.raises(UserError, match="needs 2 CUDA GPUs"):
        cli.resolve_device(load_case("gemma4-26b-a4b-tp2"), None, None)


def test_missing_checkpoint_folder():
    assert_usage_error(parity("run", "--case", "gemma4-text-tiny", "--checkpoint", "/nonexistent"),
                       "/nonexistent", "does not exist")


def test_checkpoint_case_without_checkpoint():
    env = {k: v for k, v in os.environ.items() if k != "GEMMA4_CHECKPOINT"}
    p = subprocess.run([sys.executable, "-m", "parity", "run", "--case", "gemma4-checkpoint"], capture_output=True,
                       text=True, timeout=120, env=env, cwd=ROOT)
    assert_usage_error(p, "needs a checkpoint", "GEMMA4_CHECKPOINT")


def test_out_refuses_to_overwrite(tmp_path):
    results = tmp_path / "results.json"
    results.write_text('{"earlier": true}\n')
    before = (results.read_bytes(), results.stat().st_mtime_ns)
    assert_usage_error(parity("run", "--case", "gemma4-text-tiny", "--device", "cpu", "--out", str(tmp_path)),
                       "already exists")
    assert (results.read_bytes(), results.stat().st_mtime_ns) == before
    assert not (tmp_path / "index.html").exists()


@pytest.mark.parametrize("args, needle", [
    (("run",), "--case"),
    (("run", "--case", "gemma4-text-tiny", "--dtype", "float16"), "--dtype"),
    (("run", "--case", "gemma4-text-tiny", "--frobnicate"), "--frobnicate"),
    (("run", "--case", "gemma4-text-tiny", "--seed", "x"), "--seed"),
    (("bench",), "bench"),
    ((), "choose a command"),
])
def test_usage_errors_are_one_line(args, needle):
    assert_usage_error(parity(*args), needle)


def test_bad_case_file_names_the_field(tmp_path):
    text = (ROOT / "cases" / "gemma4-text-tiny.toml").read_text().replace("batch = 2", "batch = -1")
    (tmp_path / "gemma4-text-tiny.toml").write_text(text)
    p = parity("run", "--case", "gemma4-text-tiny", env={"PARITY_CASES_DIR": str(tmp_path)})
    assert_usage_error(p, "gemma4-text-tiny.toml", "inputs.batch")
    assert_usage_error(parity("cases", env={"PARITY_CASES_DIR": str(tmp_path)}), "inputs.batch")


def test_report_needs_a_directory(tmp_path):
    assert_usage_error(parity("report", "--dir", str(tmp_path / "absent")), "no report directory")


def test_report_rerenders_an_empty_root(tmp_path):
    p = parity("report", "--dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "re-rendered 0 runs" in p.stdout and (tmp_path / "index.html").exists()


# ---------------------------------------------------------------------------------------------------
# In process, with the engine and the report writer faked: exit codes and the summary

def fake_results(passed: bool = True) -> dict:
    detail = None if passed else {"name": "model.layers.2.self_attn", "megatron_name": "decoder.layers.2.self_attention",
                                  "mode": "isolated", "metric": "rel_l2", "value": 0.031, "gate": 1e-5, "why": None}
    return {
        "case": "gemma4-text-tiny", "passed": passed, "device": "cpu", "dtype": "float32",
        "checks": {"logits": passed, "modules": passed, "roundtrip": True, "router": True},
        "summary": {"first_divergence": None if passed else "model.layers.2.self_attn",
                    "first_divergence_detail": detail,
                    "logits": {"cosine": 1.0, "rel_l2": 0.0 if passed else 0.02, "max_abs": 0.0, "top1_agreement": 1.0,
                               "kl_mean": 0.0, "kl_max": 0.0 if passed else 0.3}},
        "modules": [], "roundtrip": {"tensors": 132, "bit_exact": 132, "max_abs_diff": 0.0},
    }


@pytest.fixture
def fake_engine(monkeypatch):
    calls: list[dict] = []
    outcome: dict = {"results": fake_results(True), "raise": None}

    def execute_systems(case, **kwargs):
        calls.append({"case": case.name, **kwargs})
        if outcome["raise"] is not None:
            raise outcome["raise"]
        return [json.loads(json.dumps({**outcome["results"], "system": {"name": s}})) for s in kwargs["systems"]]

    written: list[tuple] = []

    def write_report(results, *, out=None, reports=None):
        written.append((out, reports))
        return Path(out or reports) / "index.html"

    monkeypatch.setattr(cli, "execute_systems", execute_systems)
    monkeypatch.setattr(cli, "write_report", write_report)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    return calls, outcome, written


def test_exit_0_when_parity_holds(fake_engine, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PARITY_REPORTS_DIR", raising=False)  # the default report root is asserted below
    calls, _, written = fake_engine
    assert cli.main(["run", "--case", "gemma4-text-tiny", "--out", str(tmp_path / "o"), "--seed", "7"]) == 0
    assert calls == [{"case": "gemma4-text-tiny", "device": "cpu", "dtype": None, "checkpoint": None, "seed": 7,
                      "progress": False, "systems": ["parity"]}]
    assert written == [(tmp_path / "o", Path("reports"))]
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line
    assert "parity HOLDS · first divergence: none · regressions: no history (--out) · report: " in out
    assert str(tmp_path / "o" / "index.html") in out


def test_exit_1_when_parity_fails(fake_engine, tmp_path, capsys, monkeypatch):
    _, outcome, written = fake_engine
    outcome["results"] = fake_results(False)
    monkeypatch.setenv("PARITY_REPORTS_DIR", str(tmp_path / "r"))
    assert cli.main(["run", "--case", "gemma4-text-tiny", "--dtype", "bfloat16"]) == 1
    assert written == [(None, tmp_path / "r")]  # the report is still written
    out = capsys.readouterr().out
    assert "parity FAILS (logits, modules failed)" in out
    assert "model.layers.2.self_attn = megatron decoder.layers.2.self_attention (isolated; rel_l2 0.031 > gate 1e-05)" \
        in out
    assert f"· history: {tmp_path / 'r' / 'index.html'}" in out and out.count("\n") == 1


@pytest.mark.parametrize("error, needle", [
    (UserError("checkpoint shape mismatch for x"), "checkpoint shape mismatch for x"),
    (MemoryError(), "out of memory"),
    (FileNotFoundError(2, "No such file or directory", "/x/config.json"), "No such file or directory: /x/config.json"),
])
def test_user_errors_exit_2(fake_engine, capsys, error, needle):
    _, outcome, _ = fake_engine
    outcome["raise"] = error
    assert cli.main(["run", "--case", "gemma4-text-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("parity: error: ") and needle in err, err


def test_cuda_out_of_memory_exits_2(fake_engine, capsys):
    import torch

    _, outcome, _ = fake_engine
    outcome["raise"] = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has ...")
    assert cli.main(["run", "--case", "gemma4-text-tiny"]) == 2
    err = capsys.readouterr().err
    assert err == "parity: error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB.\n"


def test_checkpoint_error_exits_2(fake_engine, capsys):
    io = pytest.importorskip("parity.bridge.io")
    _, outcome, _ = fake_engine
    outcome["raise"] = io.CheckpointError("/ckpt: missing tensor model.norm.weight")
    assert cli.main(["run", "--case", "gemma4-text-tiny"]) == 2
    assert capsys.readouterr().err == "parity: error: /ckpt: missing tensor model.norm.weight\n"


def test_bug_is_not_a_verdict(fake_engine, capsys):
    _, outcome, _ = fake_engine
    outcome["raise"] = RuntimeError("boom")
    assert cli.main(["run", "--case", "gemma4-text-tiny"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err


def test_checkpoint_env_reaches_the_engine(fake_engine, tmp_path, monkeypatch):
    calls, _, _ = fake_engine
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("GEMMA4_CHECKPOINT", str(tmp_path))
    assert cli.main(["run", "--case", "gemma4-checkpoint"]) == 0
    assert calls[0]["checkpoint"] == str(tmp_path) and calls[0]["device"] == "cpu"


def test_multigpu_without_launcher(monkeypatch):
    from parity.cases import load_case
    from parity.engine import launch

    monkeypatch.setattr(launch, "distributed_available", lambda: False)
    with pytest.raises(UserError, match="multi-GPU launch"):
        launch.execute(load_case("gemma4-26b-a4b-tp2"), device="cuda")


def test_write_report_refuses_existing_out(tmp_path):
    """The real writer's FileExistsError (a racing writer) becomes a one-line user error."""
    pytest.importorskip("parity.report.store")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        cli.write_report(fake_results(), out=tmp_path)
    assert (tmp_path / "results.json").read_text() == "{}"


def test_bench_targets_arithmetic():
    from parity.bench import targets

    rec = {"phases_s": {"hf_forward": 1.0, "megatron_forward": 2.0, "metrics": 0.5},
           "timings": {"hf_forward_s": 0.4, "megatron_forward_s": 0.8},
           "ratios": {"wall_over_forwards_plus_conversion": 3.5}, "peak_memory": {"gpu_peak_gib": 65.0}}
    t = targets(rec)
    assert t["capture_plus_metrics_over_forwards"]["value"] == pytest.approx((0.6 + 1.2 + 0.5) / 1.2)
    assert not t["capture_plus_metrics_over_forwards"]["met"]
    assert t["megatron_over_hf_forward"] == {"value": pytest.approx(2.0), "limit": 1.5, "met": False}
    assert t["wall_over_forwards_plus_conversion"]["met"] is False and t["gpu_peak_gib"]["met"] is True


def test_bench_wall_targets_by_system():
    """Issue 23's walls (26B on one H200: 30 s with our system, 45 s with Megatron-Bridge): a single record's whole
    wall, and in a several-systems record each system's phases with the reference's (and probing's share of them)."""
    from parity.bench import several, targets

    rec = {"case": "gemma4-26b-a4b", "device": "cuda", "system": {"name": "megatron-bridge"}, "wall_s": 44.0,
           "phases_s": {}, "timings": {}, "ratios": {}}
    assert targets(rec)["wall_s"] == {"value": 44.0, "limit": 45.0, "met": True}
    assert "wall_s" not in targets({**rec, "device": "cpu"}) and "wall_s" not in targets({**rec, "case": "x"})

    def run(name, phases):
        return {"case": "gemma4-26b-a4b", "device": "cuda", "dtype": "bfloat16", "system": {"name": name},
                "env": {}, "passed": True, "summary": {"n_failed": 0}, "phases": {"build_hf": 5.0, **phases}}
    ours = {**run("parity", {"convert": 20.0, "probing": 6.0}), "probing": {"families": {"window": {"seconds": 4.0}}}}
    r = several([ours, run("megatron-bridge", {"convert": 45.0})], 80.0)
    assert r["per_system"]["parity"]["probing_families_s"] == {"window": 4.0}
    assert r["per_system"]["parity"]["run_s"] == 31.0 and r["per_system"]["megatron-bridge"]["run_s"] == 50.0
    assert r["targets"] == {"parity_phases_s": {"value": 31.0, "limit": 30.0, "met": False},
                            "parity_probing_share": {"value": pytest.approx(6 / 31), "limit": 0.15, "met": False},
                            "megatron-bridge_phases_s": {"value": 50.0, "limit": 45.0, "met": False}}


def test_bench_repeat_times_every_run_and_records_the_last(monkeypatch, tmp_path, capsys):
    """``bench --repeat N``: N runs in one process, the record the last's with each wall (a fresh machine's first run
    was slower in every phase); fewer than 1 is a usage error before anything runs."""
    from parity import bench as B
    from parity.cases import load_case
    from parity.engine import launch

    runs = []
    monkeypatch.setattr(launch, "execute_systems", lambda case, **kw: runs.append(kw) or [
        {**fake_results(True), "case": case.name, "device": "cpu", "dtype": "float32", "system": {"name": "parity"},
         "env": {}, "phases": {"build_hf": float(len(runs))}}])
    monkeypatch.setattr(B, "single", lambda results, walls, out_dir, system: (results, walls))
    results, walls = B.bench(load_case("gemma4-text-tiny"), device="cpu", dtype=None, out_dir=tmp_path, repeat=3)
    assert len(runs) == 3 and results["phases"] == {"build_hf": 3.0} and len(walls) == 3 and walls[-1] > 0
    assert cli.main(["bench", "--case", "gemma4-text-tiny", "--repeat", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "parity: error: --repeat 0: at least 1" and len(runs) == 3


def test_checkpoint_folder_without_config_fails_before_heavy_imports(tmp_path):
    """A folder that is not an HF checkpoint: one line, exit 2, before torch/transformers/megatron load."""
    code = ("import sys; from parity import cli; rc = cli.main(['run', '--case', 'gemma4-text-tiny', "
            f"'--checkpoint', {str(tmp_path)!r}]); "
            "print(sorted(m for m in ('torch', 'transformers', 'megatron') if m in sys.modules)); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout.strip() == "[]", p.stdout + p.stderr
    assert p.stderr.strip() == f"parity: error: {tmp_path / 'config.json'}: missing (not an HF checkpoint folder)"


def test_verbose_prints_notices_and_the_report_keeps_them(fake_engine, tmp_path, capsys, monkeypatch):
    import logging

    _, outcome, _ = fake_engine

    def noisy(case, **kwargs):
        logging.getLogger("megatron.core.optimizer").warning("Transformer Engine and Apex are not installed.")
        return [json.loads(json.dumps({**fake_results(True), "env": {"torch": "2.13.0"}}))]

    monkeypatch.setattr(cli, "execute_systems", noisy)
    written = []
    monkeypatch.setattr(cli, "write_report", lambda results, **kw: written.append(results) or tmp_path / "x.html")
    assert cli.main(["run", "--case", "gemma4-text-tiny", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "Transformer Engine" not in captured.err + captured.out
    notice = "megatron.core.optimizer: Transformer Engine and Apex are not installed."
    assert written[0]["env"]["warnings"] == [notice]
    assert cli.main(["run", "--case", "gemma4-text-tiny", "--out", str(tmp_path / "b"), "--verbose"]) == 0
    assert f"notice: {notice}" in capsys.readouterr().err


def test_card_subcommand(tmp_path, capsys):
    assert cli.main(["card", "--dir", str(tmp_path / "none")]) == 2
    (tmp_path / "runs").mkdir()
    assert cli.main(["card", "--dir", str(tmp_path)]) == 2  # no run covered: not a pass, nothing ran
    out, err = capsys.readouterr()
    assert "verification_card:" in out and "parity card: no case ran: no run in " in err


def test_plain_run_prints_one_line_and_no_warnings(tmp_path):
    """The real engine on the tiny case, as a user runs it: nothing on stderr, one line on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PARITY_"))}
    p = subprocess.run([sys.executable, "-m", "parity", "run", "--case", "gemma4-text-tiny", "--reports",
                        str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr == ""
    (line,) = p.stdout.splitlines()
    assert line.startswith("gemma4-text-tiny on cpu in float32: parity HOLDS · first divergence: none · ")
    assert f"history: {tmp_path / 'index.html'}" in line
    (run,) = (tmp_path / "runs").iterdir()
    env_rec = json.loads((run / "results.json").read_text())["env"]
    assert isinstance(env_rec["warnings"], list) and env_rec["threads"] == 1


def test_case_system_and_the_explicit_override(fake_engine, tmp_path):
    calls, _, _ = fake_engine
    assert cli.main(["run", "--case", "gemma4-text-tiny-megatron-bridge", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["run", "--case", "gemma4-text-tiny-megatron-bridge", "--system", "parity",
                     "--out", str(tmp_path / "b")]) == 0
    assert cli.main(["run", "--case", "gemma4-text-tiny", "--system", "megatron-bridge",
                     "--out", str(tmp_path / "c")]) == 0
    assert [c["systems"] for c in calls] == [["megatron-bridge"], ["parity"], ["megatron-bridge"]]


def test_several_systems_one_reference_and_a_page_side_by_side(fake_engine, tmp_path, capsys):
    """``--system parity,megatron-bridge``: one engine call for both (one HF reference), each system's report in
    ``DIR/<system>/``, ``DIR/index.html`` beside them; a second run into the same folder is refused."""
    from parity.report.store import write_to

    calls, outcome, _ = fake_engine
    cli.write_report = lambda results, *, out=None, reports=None: write_to(results, out) / "index.html"
    out = tmp_path / "both"
    assert cli.main(["run", "--case", "gemma4-text-tiny", "--system", "parity,megatron-bridge", "--out", str(out)]) == 0
    assert [c["systems"] for c in calls] == [["parity", "megatron-bridge"]]
    assert (out / "parity" / "results.json").is_file() and (out / "megatron-bridge" / "index.html").is_file()
    page = (out / "index.html").read_text()
    assert 'href="parity/index.html"' in page and 'href="megatron-bridge/index.html"' in page
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[-1] == f"systems side by side: {out / 'index.html'}"
    assert cli.main(["run", "--case", "gemma4-text-tiny", "--system", "parity,megatron-bridge", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and len(calls) == 1
    for bad, why in (("parity,parity", "a system named twice"), ("parity,", "an empty system name"),
                     ("parity,nope", "unknown system under test 'nope'")):
        assert cli.main(["run", "--case", "gemma4-text-tiny", "--system", bad, "--out", str(tmp_path / "x")]) == 2
        assert why in capsys.readouterr().err


def test_unknown_system_is_one_line(tmp_path):
    assert_usage_error(parity("run", "--case", "gemma4-text-tiny", "--system", "nemo"),
                       "unknown system under test 'nemo'")
    text = (ROOT / "cases" / "gemma4-text-tiny.toml").read_text().replace("[model]", '[system]\nname = "nemo"\n\n[model]')
    (tmp_path / "gemma4-text-tiny.toml").write_text(text)
    p = parity("run", "--case", "gemma4-text-tiny", env={"PARITY_CASES_DIR": str(tmp_path)})
    assert_usage_error(p, "gemma4-text-tiny.toml", "system.name: unknown system under test 'nemo'")


# ---------------------------------------------------------------------------------------------------
# Output locations, checked before anything is built; Ctrl-C

@pytest.mark.parametrize("flag, where, why", [
    ("--reports", "file", "is a file, not a folder"),
    ("--reports", "file/sub", "is a file, so"),
    ("--reports", "root-with-runs-file", "runs is a file, not a folder"),
    ("--out", "file", "is a file, not a folder"),
    ("--out", "file/sub", "is a file, so"),
])
def test_bad_output_locations_fail_before_the_engine_runs(fake_engine, tmp_path, capsys, flag, where, why):
    calls, _, written = fake_engine
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "root-with-runs-file").mkdir()
    (tmp_path / "root-with-runs-file" / "runs").write_text("")
    assert cli.main(["run", "--case", "gemma4-text-tiny", flag, str(tmp_path / where)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("parity: error: ") and why in err, err
    assert calls == [] and written == []  # nothing ran


def test_bad_report_root_from_the_environment_and_bench_out(fake_engine, tmp_path, capsys, monkeypatch):
    calls, _, _ = fake_engine
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PARITY_REPORTS_DIR", str(tmp_path / "file"))
    assert cli.main(["run", "--case", "gemma4-text-tiny"]) == 2
    assert f"parity: error: report root {tmp_path / 'file'}: {tmp_path / 'file'} is a file" in capsys.readouterr().err
    assert cli.main(["bench", "--case", "gemma4-text-tiny", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err and calls == []


def test_a_report_root_that_is_a_file_costs_one_line_and_no_run(tmp_path):
    """The whole command as users run it: exit 2 in one line, before the model is built (no torch forward)."""
    import time

    (tmp_path / "reports").write_text("")
    t0 = time.perf_counter()
    p = parity("run", "--case", "gemma4-text-tiny", "--reports", str(tmp_path / "reports"))
    assert_usage_error(p, f"report root {tmp_path / 'reports'}: {tmp_path / 'reports'} is a file, not a folder")
    assert time.perf_counter() - t0 < 30 and "torch" not in p.stderr


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_at_any_moment_exits_130_and_writes_nothing_half(tmp_path, delay):
    """SIGINT during imports (torch, transformers, megatron-core) or the run: exit 130, one line, no traceback, and
    the --out folder holds no report or a whole one."""
    import signal
    import time

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "parity", "run", "--case", "gemma4-text-tiny", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130 and stderr == "parity: interrupted\n" and stdout == "", (p.returncode, stderr)
    assert not out.exists() or sorted(f.name for f in out.iterdir()) in ([], ["index.html", "results.json"])
