"""The verification card: YAML of versions, commands, model identity, inputs, gates, reproducers, per-check rows
(first divergence or closest to the gate), skipped cases, round-trip counts and regressions; its schema."""
from __future__ import annotations

import importlib.util
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from parity.report import summary as S
from parity.report.card import SCHEMA, build, dumps, main, schema_errors
from parity.report.store import write_run, write_session

_spec = importlib.util.spec_from_file_location("make_results", Path(__file__).parent / "fixtures" / "make_results.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_results = _fixtures.make_results

T0 = datetime(2026, 5, 9, 2, 0, tzinfo=timezone.utc)
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="2" tests="6"><testcase classname="parity.suites.test_gemma4" name="test_logits[gemma4-text-tiny]"/>
<testcase classname="parity.suites.test_gemma4" name="test_modules[gemma4-text-tiny]"><failure message="x"/>
</testcase></testsuite></testsuites>"""


def _night(root: Path, t: datetime, **kw) -> Path:
    r = make_results(created=t, **kw)
    r["env"]["command"] = "python -m pytest parity -k gemma4 --parity-device cuda"
    return write_run(r, root)


def test_card_covers_tonights_runs_with_checks_roundtrip_and_regressions(tmp_path):
    _night(tmp_path, T0)  # last night
    tonight = T0 + timedelta(days=1)
    a = _night(tmp_path, tonight, bump={"model.layers.4.experts": 60.0})
    _night(tmp_path, tonight + timedelta(minutes=5), case="gemma4-26b-a4b", dtype="bfloat16", device="cuda")
    card = build(tmp_path, since=tonight)["verification_card"]
    assert card["totals"] == {"runs": 2, "passed": 2, "failed": 0, "skipped": 0, "errored": 0, "regressions": 2,
                              "corrupt": 0,
                              "roundtrip_tensors": 2 * make_results()["roundtrip"]["tensors"],
                              "roundtrip_bit_exact": card["totals"]["roundtrip_tensors"]}
    runs = card["runs"]
    assert [r["case"] for r in runs] == ["gemma4-text-tiny", "gemma4-26b-a4b"]
    tiny = runs[0]
    rt = make_results()["roundtrip"]
    assert tiny["roundtrip"]["tensors"] == tiny["roundtrip"]["bit_exact"] == rt["tensors"]
    assert tiny["regressions"]["count"] == 2 and tiny["regressions"]["previous_run"] is not None
    assert all("model.layers.4.experts" in m for m in tiny["regressions"]["flags"])
    assert tiny["report"] == f"runs/{a.name}/index.html" and tiny["first_divergence"] is None
    assert runs[1]["regressions"]["previous_run"] is None  # first run of its group
    assert card["versions"]["megatron_core"] == "0.19.2" and card["commands"] == [
        "python -m pytest parity -k gemma4 --parity-device cuda"]
    assert card["passed"] is True and card["outcome"] == "regression"
    assert tiny["checks"]["modules"]["result"] == "pass" and tiny["checks"]["modules"]["row"]["why"] == \
        "closest to its gate"
    again = yaml.safe_load(dumps({"verification_card": card}))["verification_card"]
    assert again["totals"] == card["totals"] and again["runs"][0]["logits"] == tiny["logits"]


def test_card_of_a_failing_run_names_checks_and_first_divergence(tmp_path):
    _night(tmp_path, T0, failure="rope")
    card = build(tmp_path)["verification_card"]
    run = card["runs"][0]
    assert card["passed"] is False and run["passed"] is False
    assert run["first_divergence"]["module"] == "model.layers.2.self_attn"
    assert run["first_divergence"]["mode"] == "isolated" and run["first_divergence"]["gate"] == "rel_l2 ≤ 1e-5"
    assert run["modules"]["failed"] > 0 and run["roundtrip"]["bit_exact"] == run["roundtrip"]["tensors"] - 1


def test_card_exit_codes(tmp_path, capsys):
    _night(tmp_path, T0)
    _night(tmp_path, T0 + timedelta(hours=1), bump={"model.layers.4.experts": 60.0})
    out = tmp_path / "card.yaml"
    assert main(["--dir", str(tmp_path), "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["verification_card"]["totals"]["regressions"] == 2
    assert main(["--dir", str(tmp_path), "--fail-on-regression"]) == 5  # a regression, nothing failing
    assert "&id" not in capsys.readouterr().out
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    assert main(["--dir", str(tmp_path), "--junit", str(junit), "--since", "2026-05-09T02:30:00Z"]) == 1
    card = yaml.safe_load(capsys.readouterr().out)["verification_card"]
    assert card["junit"]["tests"] == 6 and card["junit"]["failures"] == 1
    assert card["junit"]["failing"] == ["parity.suites.test_gemma4::test_modules[gemma4-text-tiny]"]
    assert card["totals"]["runs"] == 1
    assert main(["--dir", str(tmp_path / "missing")]) == 2


def test_card_counts_corrupt_runs_and_an_empty_window_fails(tmp_path):
    _night(tmp_path, T0)
    broken = tmp_path / "runs" / "20260510T020000000Z-gemma4-text-tiny-000000"
    broken.mkdir()
    (broken / "results.json").write_text("{")
    card = build(tmp_path, since=datetime(2026, 5, 10, tzinfo=timezone.utc))["verification_card"]
    assert card["totals"]["corrupt"] == 1 and card["passed"] is False
    assert card["corrupt_runs"][0]["run"] == broken.name
    assert main(["--dir", str(tmp_path), "--since", "2030-01-01T00:00:00Z"]) == 1  # nothing ran: not a pass


def _skip(id_: str, reason: str, **kw) -> dict:
    return {"id": id_, "case": kw.get("case", id_), "system": kw.get("system", "parity"), "device": "cuda",
            "dtype": kw.get("dtype", "bfloat16"), "reason": reason}


def test_each_check_names_its_first_divergence_when_failing_and_its_closest_row_when_passing(tmp_path):
    """On a failing run the modules check names the engine's first divergence (an isolated self_attn early in
    the model), not the worst row (a row far past its gate, end to end, deeper in); a passing check names the row
    that uses the largest share of its gate."""
    bad = make_results(created=T0, failure="rope")
    deep = next(r for r in bad["modules"] if r["name"] == "model.layers.5" and r["mode"] == "end_to_end")
    deep["rel_l2"] = 50.0  # the worst row by far: deeper, end to end
    write_run(bad, tmp_path)
    checks = build(tmp_path)["verification_card"]["runs"][0]["checks"]
    worst = S.tightest(bad)
    modules = checks["modules"]
    assert modules["result"] == "fail" and modules["row"]["why"] == "first divergence"
    assert (modules["row"]["module"], modules["row"]["mode"]) == ("model.layers.2.self_attn", "isolated")
    assert (worst["name"], worst["mode"]) == ("model.layers.5", "end_to_end")  # what closest_to_gate reported
    assert S.gate_usage(worst) > modules["row"]["gate_use"] > 1
    assert modules["row"]["gate"] == "rel_l2 ≤ 1e-5"
    assert modules["row"]["megatron"] == "decoder.layers.2.self_attention"
    # the router check: its first failing router row in forward order, not a layer's row
    router = checks["router"]["row"]
    assert router["module"].endswith(".router") and router["why"] == "first divergence"
    first_router = min((r for r in bad["modules"] if r["kind"] == "router" and not r["passed"]),
                       key=lambda r: r["order"])
    assert router["module"] == first_router["name"]
    assert checks["roundtrip"] == {"result": "fail", "row": {
        "module": "model.layers.1.router.scale", "megatron": None, "mode": "roundtrip", "metric": "max_abs_diff",
        "value": 0.00390625, "gate": "bit-exact", "gate_use": None, "why": "first divergence"}}
    # a passing run: every check's row is the one closest to its gate
    good = make_results()
    _night(tmp_path / "ok", T0)
    checks = build(tmp_path / "ok")["verification_card"]["runs"][0]["checks"]
    closest = max((r for r in good["modules"] if r["kind"] != "router"), key=S.gate_usage)
    assert checks["modules"]["row"]["module"] == closest["name"] and checks["modules"]["row"]["mode"] == closest["mode"]
    assert checks["modules"]["row"]["gate_use"] == float(f"{S.gate_usage(closest):.6g}") < 1
    assert checks["roundtrip"] == {"result": "pass", "row": None}  # every tensor bit-exact: no row says more


def test_model_identity_inputs_gates_and_a_reproducer_per_run(tmp_path):
    _night(tmp_path, T0)
    r = make_results(created=T0 + timedelta(minutes=1), dtype="bfloat16", device="cuda", case="gemma4-26b-a4b",
                     n_layers=30)
    r["model"] = {"weights": "checkpoint", "builder": "checkpoint", "checkpoint": "/data/gemma 4"}
    r["system"] = {"name": "megatron-bridge"}
    write_run(r, tmp_path)
    tiny, big = build(tmp_path)["verification_card"]["runs"]
    assert tiny["model"] == {"config_hash": make_results()["config_hash"], "weights": "random",
                             "builder": "tiny_text", "checkpoint": None}
    assert tiny["inputs"]["tokens"] == 64 and tiny["inputs"]["lengths"] == [32, 32] and tiny["inputs"]["batch"] == 2
    assert tiny["gates"] == {"float32": {"rel_l2": 1e-05, "logits_rel_l2": 1e-05, "kl_max": 1e-06},
                             "exact": ["model.embed_tokens"]}
    assert tiny["reproduce"] == "python -m parity run --case gemma4-text-tiny --device cpu --dtype float32 --seed 0"
    # bf16 with the fp32 replay: both gate sections judged it
    assert list(big["gates"]) == ["bfloat16", "float32", "exact"]
    assert big["model"]["weights"] == "checkpoint" and big["model"]["checkpoint"] == "/data/gemma 4"
    assert big["reproduce"] == ("python -m parity run --case gemma4-26b-a4b --device cuda --dtype bfloat16 --seed 0 "
                                "--checkpoint '/data/gemma 4' --system megatron-bridge")
    old = make_results(created=T0 + timedelta(minutes=2), case="older")
    del old["model"], old["inputs"]
    write_run(old, tmp_path)
    entry = next(e for e in build(tmp_path)["verification_card"]["runs"] if e["case"] == "older")
    assert entry["model"]["weights"] == "unknown" and entry["inputs"] == {"tokens": None}


def test_skipped_cases_are_listed_with_their_reasons(tmp_path, capsys):
    """A GPU night: two cases ran, two were skipped; the card lists both skips (and only tonight's)."""
    write_session(tmp_path, {"created": "2026-05-08T02:00:00Z", "skipped": [_skip("old", "yesterday's reason")]})
    _night(tmp_path, T0)
    write_session(tmp_path, {"created": "2026-05-09T02:00:00Z", "ran": [{"id": "gemma4-text-tiny"}], "skipped": [
        _skip("gemma4-26b-a4b-checkpoint", "needs a checkpoint (case gemma4-26b-a4b-checkpoint): pass "
              "--parity-checkpoint DIR or set GEMMA4_CHECKPOINT"),
        _skip("gemma4-26b-a4b-tp2", "needs 2 CUDA GPUs, found 1 (case gemma4-26b-a4b-tp2)")]})
    card = build(tmp_path, since=T0 - timedelta(minutes=1))["verification_card"]
    assert [k["id"] for k in card["skipped"]] == ["gemma4-26b-a4b-checkpoint", "gemma4-26b-a4b-tp2"]
    assert card["skipped"][1]["reason"] == "needs 2 CUDA GPUs, found 1 (case gemma4-26b-a4b-tp2)"
    assert card["totals"]["skipped"] == 2 and card["outcome"] == "pass"
    assert schema_errors(card and {"verification_card": card}) == []
    assert main(["--dir", str(tmp_path), "--since", "2026-05-09T01:59:00Z"]) == 0
    assert "skipped:\n  - id: gemma4-26b-a4b-checkpoint\n" in capsys.readouterr().out
    # without --since: the latest session's skips
    assert [k["id"] for k in build(tmp_path)["verification_card"]["skipped"]] == [
        "gemma4-26b-a4b-checkpoint", "gemma4-26b-a4b-tp2"]


def test_a_night_where_nothing_ran_exits_2_and_lists_the_skips(tmp_path, capsys):
    write_session(tmp_path, {"created": "2026-05-09T02:00:00Z", "ran": [], "skipped": [
        _skip("gemma4-text-tiny", "--parity-device cuda, but no CUDA GPU here (case gemma4-text-tiny)"),
        _skip("gemma4-26b-a4b", "needs CUDA (case gemma4-26b-a4b)")]})
    out = tmp_path / "card.yaml"
    assert main(["--dir", str(tmp_path), "--since", "2026-05-09T02:00:00Z", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "parity card: no case ran: gemma4-text-tiny (--parity-device cuda, but no CUDA GPU here); " \
           "gemma4-26b-a4b (needs CUDA)\n" in err
    card = yaml.safe_load(out.read_text())
    assert card["verification_card"]["outcome"] == "nothing_ran" and card["verification_card"]["passed"] is False
    assert schema_errors(card) == []
    empty = tmp_path / "empty"
    (empty / "runs").mkdir(parents=True)
    assert main(["--dir", str(empty)]) == 2
    assert f"no case ran: no run in {empty}, and no pytest session recorded a skip" in capsys.readouterr().err


def test_a_run_that_raised_is_a_failure(tmp_path):
    _night(tmp_path, T0)
    write_session(tmp_path, {"created": "2026-05-09T02:00:00Z", "ran": [], "skipped": [],
                             "errors": [{"id": "err", "case": "err", "error": "RuntimeError: engine exploded"}]})
    card = build(tmp_path, since=T0 - timedelta(hours=1))["verification_card"]
    assert card["outcome"] == "fail" and card["errored"] == [
        {"id": "err", "case": "err", "error": "RuntimeError: engine exploded"}]
    assert main(["--dir", str(tmp_path), "--since", "2026-05-09T01:00:00Z"]) == 1


def test_cards_validate_against_the_documented_schema(tmp_path):
    import json

    schema = json.loads(SCHEMA.read_text())
    assert SCHEMA.name == "card-schema.json" and SCHEMA.parent.name == "nightly"
    _night(tmp_path, T0)
    _night(tmp_path, T0 + timedelta(hours=1), failure="rope", dtype="bfloat16")
    write_session(tmp_path, {"created": "2026-05-09T05:00:00Z", "skipped": [_skip("big", "needs CUDA (case big)")]})
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    card = yaml.safe_load(dumps(build(tmp_path, junit=junit)))  # as a reader gets it: through YAML
    assert schema_errors(card, schema) == []
    runs = card["verification_card"]["runs"]
    assert {r["passed"] for r in runs} == {True, False} and card["verification_card"]["junit"]["tests"] == 6
    # the check can fail: a missing field, a wrong type, an unknown value, an undocumented key
    del runs[0]["model"]
    runs[1]["inputs"]["tokens"] = "64"
    runs[1]["checks"]["modules"]["row"]["why"] = "worst row"
    card["verification_card"]["extra"] = 1
    assert schema_errors(card, schema) == [
        "card.verification_card.runs[0]: missing 'model'",
        "card.verification_card.runs[1].inputs.tokens: str '64', expected integer or null",
        "card.verification_card.runs[1].checks.modules.row.why: 'worst row' not one of ['first divergence', "
        "'closest to its gate']",
        "card.verification_card: unexpected key 'extra'"]


def test_a_cpu_only_nightly_exits_2_and_lists_the_skips(tmp_path):
    """scripts/nightly.sh on a machine without CUDA (PARITY_DEVICE defaults to cuda): every case of the real suite
    is skipped, so the night exits 2 with "no case ran: ..." naming each skip, and its card lists them."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("needs a machine without CUDA")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PARITY_", "GEMMA4_"))}
    env.update(PYTHON=sys.executable, PARITY_NIGHTLY_REPORTS=str(tmp_path / "reports"), PYTHONWARNINGS="ignore")
    p = subprocess.run(["bash", str(root / "scripts" / "nightly.sh"), "-k", "text-tiny"], capture_output=True,
                       text=True, timeout=600, env=env)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    (night,) = (tmp_path / "reports" / "nights").iterdir()  # the night's artifacts live in the report root
    card = yaml.safe_load((night / "verification-card.yaml").read_text())["verification_card"]
    skipped = {k["id"]: k["reason"] for k in card["skipped"]}
    assert "gemma4-text-tiny" in skipped and len(skipped) >= 3 and card["outcome"] == "nothing_ran"
    assert all(reason.startswith("needs CUDA (case ") for reason in skipped.values()), skipped
    line = next(x for x in p.stderr.splitlines() if x.startswith("parity card: no case ran: "))
    assert line == f"parity card: no case ran: {', '.join(skipped)} (needs CUDA)"
    assert "SKIP  gemma4-text-tiny " in p.stdout and schema_errors({"verification_card": card}) == []


def test_the_ci_example_uploads_the_whole_report_root_and_its_links_resolve_inside_it(tmp_path):
    """docs/nightly/github-actions.yml keeps the report root as one artifact, tonight's files inside it; every
    link of the history page and of a run page points at a file inside the root (none is dead in the artifact)."""
    import re

    root_dir = Path(__file__).resolve().parent.parent
    job = yaml.safe_load((root_dir / "docs" / "nightly" / "github-actions.yml").read_text())["jobs"]["parity"]
    env = job["env"]
    assert env["PARITY_NIGHTLY_OUT"].startswith(env["PARITY_NIGHTLY_REPORTS"] + "/")
    (upload,) = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload["with"]["path"] == "${{ env.PARITY_NIGHTLY_REPORTS }}" and upload["if"] == "always()"
    _night(tmp_path, T0)
    _night(tmp_path, T0 + timedelta(hours=1), failure="rope")
    write_session(tmp_path, {"created": "2026-05-09T03:00:00Z", "skipped": [_skip("big", "needs CUDA (case big)")]})
    from parity.report.store import write_index

    pages = [write_index(tmp_path)] + sorted(tmp_path.glob("runs/*/index.html"))
    for page in pages:
        hrefs = [h for h in re.findall(r'href="([^"#]+)', page.read_text()) if "://" not in h]
        assert hrefs, page
        for h in hrefs:
            target = (page.parent / h).resolve()
            assert target.is_file() and tmp_path.resolve() in target.parents, (page, h)
    card = build(tmp_path)["verification_card"]
    assert all((tmp_path / r["report"]).is_file() for r in card["runs"]) and card["history"] == "index.html"


def test_a_lora_run_carries_its_adapter_counts(tmp_path):
    """A LoRA case's run: targets, rank, alpha, the adapter and merged exports' counts and their logits, in the
    documented schema."""
    import json

    r = make_results(created=T0)
    r["lora"] = {"targets": ["q_proj", "o_proj"], "r": 4, "alpha": 8.0, "export_loads": True,
                 "export": {"hf": 24, "exported": 25, "bit_exact": 23, "missing": ["a"], "extra": ["b"]},
                 "merged": {"hf": 132, "exported": 132, "bit_exact": 132, "missing": [], "extra": []},
                 "export_logits": {"vs_peft_rel_l2": 0.0}, "merged_logits": {"vs_peft_rel_l2": 1e-7}}
    write_run(r, tmp_path)
    card = yaml.safe_load(dumps(build(tmp_path, since=T0 - timedelta(hours=1))))
    assert schema_errors(card, json.loads(SCHEMA.read_text())) == []
    lora = card["verification_card"]["runs"][0]["lora"]
    assert lora["adapter_export"] == {"hf": 24, "exported": 25, "bit_exact": 23, "missing": 1, "extra": 1}
    assert lora["merged_export"]["bit_exact"] == 132 and lora["merged_logits_rel_l2"] == 1e-7
