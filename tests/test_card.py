"""The verification card: YAML of versions, commands, per-check results, round-trip counts and regressions."""
from __future__ import annotations

import importlib.util
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from parity.report.card import build, dumps, main
from parity.report.store import write_run

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
    assert card["totals"] == {"runs": 2, "passed": 2, "failed": 0, "regressions": 2, "corrupt": 0,
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
    assert card["passed"] is True
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
    assert main(["--dir", str(tmp_path), "--fail-on-regression"]) == 1
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
