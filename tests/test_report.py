"""Tests of the report package: rendering, escaping, self-containment, storage, history and regressions."""
from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from parity.report import compare, find_previous, load_runs, render_index, render_run, results_frame, runs_frame
from parity.report import store
from parity.report.cli import rerender
from parity.report.history import RULE
from parity.report.store import write_run, write_to
from parity.report.summary import fmt

_spec = importlib.util.spec_from_file_location("make_results", Path(__file__).parent / "fixtures" / "make_results.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_results = _fixtures.make_results

T0 = datetime(2026, 5, 9, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def passing() -> dict:
    return make_results(created=T0)


@pytest.fixture(scope="module")
def failing() -> dict:
    return make_results(created=T0 + timedelta(hours=1), failure="rope")


def _external_refs(html: str) -> list[str]:
    """Attribute values or CSS urls that point outside the file (any scheme, or protocol-relative)."""
    refs = re.findall(r"""\b(?:src|href|action|poster|data|xlink:href|srcset)\s*=\s*["']?\s*([^"'\s>]+)""", html, re.I)
    refs += re.findall(r"""url\(\s*["']?([^"')]+)""", html, re.I)
    return [r for r in refs if re.match(r"^(?:[a-z][a-z0-9+.-]*:|//)", r, re.I)]


# ---------------------------------------------------------------------------------------------- rendering


def test_passing_report_shows_verdict_and_no_divergence(passing):
    html = render_run(passing, None)
    assert 'data-verdict="PASS"' in html and ">PASS<" in html
    assert 'id="first-divergence"' in html and ">none<" in html
    assert "gemma4-text-tiny" in html
    assert 'id="worst-layer"' in html and "model.layers.5" in html  # last layer is the worst end-to-end
    assert "No earlier run" in html


def test_failing_report_shows_first_divergence_worst_layer_and_logits(failing):
    html = render_run(failing, None)
    assert 'data-verdict="FAIL"' in html
    fd = failing["summary"]["first_divergence_detail"]
    card = html[html.index('id="first-divergence"'):html.index('id="worst-layer"')]
    assert fd["name"] in card and fd["megatron_name"] in card and "isolated" in card
    assert "rel_l2 ≤ 1e-5" in card
    worst = html[html.index('id="worst-layer"'):html.index('id="logits-card"')]
    assert "model.layers.5" in worst and "full" in worst
    logits = html[html.index('id="logits-card"'):html.index('class="strip"')]
    lg = failing["summary"]["logits"]
    for label, key in (("rel L2", "rel_l2"), ("KL max", "kl_max"), ("KL mean", "kl_mean")):
        assert f">{label}<" in logits and f">{fmt(lg[key])}<" in logits
    # sections below the first screen
    for sid in ("layers", "modules", "routers", "logits", "roundtrip", "provenance", "regressions"):
        assert f'id="{sid}"' in html, sid
    assert "model.layers.1.router.scale" in html  # the round-trip mismatch is listed
    assert html.index("model.layers.1.router.scale") < html.index("model.layers.0.input_layernorm.weight")


def test_module_table_marks_failures_and_groups_by_layer(failing):
    html = render_run(failing, None)
    table = html[html.index('id="modtable"'):html.index('id="routers"')]
    n_bad = sum(1 for m in failing["modules"] if not m["passed"])
    assert table.count('<tr class="bad') == n_bad
    for i in range(6):
        assert '<tr class="grp' in table and f">model.layers.{i}<" in table
    assert "text: before the layers" in table and "text: after the layers" in table
    assert table.index("model.embed_tokens") < table.index("model.layers.0.input_layernorm") < table.index(
        "model.norm")


def test_layer_types_drive_chart_markers(passing):
    html = render_run(passing, None)
    full = [i for i, t in enumerate(passing["layer_types"]) if t == "full_attention"]
    for i in full:
        assert f"layer {i}: full attention" in html  # shaded band with its tooltip
    assert "<svg" in html and "<rect" in html and "<polyline" in html


@pytest.mark.parametrize("variant", ["pass", "fail", "index"])
def test_no_external_references(variant, passing, failing, tmp_path):
    if variant == "index":
        write_run(passing, tmp_path)
        write_run(failing, tmp_path)
        html = (tmp_path / "index.html").read_text()
    else:
        html = render_run(passing if variant == "pass" else failing, passing)
    assert _external_refs(html) == []
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "<link" not in html and "<img" not in html and "<iframe" not in html
    assert html.count("<script") == 1 and "<script src" not in html


def test_strings_are_escaped(passing):
    evil = json.loads(json.dumps(passing))
    evil["case"] = 'case"><script>alert("case")</script>'
    evil["env"]["host"] = "<img src=x onerror=alert(1)>"
    evil["modules"][3]["name"] = "model.layers.0.<script>alert(1)</script>"
    evil["modules"][3]["passed"] = False
    evil["passed"] = False
    evil["summary"]["first_divergence"] = evil["modules"][3]["name"]
    evil["summary"]["first_divergence_detail"] = {"name": evil["modules"][3]["name"], "megatron_name": "<b>x</b>",
                                                  "mode": "isolated", "metric": "rel_l2", "value": 1.0,
                                                  "gate": {"metric": "rel_l2", "max": 1e-5}}
    evil["roundtrip"]["rows"][0]["name"] = "</table><script>alert(2)</script>"
    evil["phases"]["<script>p</script>"] = 1.0
    html = render_run(evil, None)
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>x</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<script") == 1
    index = render_index([evil])
    assert "<script>alert" not in index and index.count("<script") == 1


def test_missing_optional_sections_render():
    minimal = {"case": "dense-tiny", "passed": True}
    html = render_run(minimal, None)
    assert 'data-verdict="PASS"' in html and 'id="routers"' not in html and 'id="layers"' not in html
    assert "No module rows" in html and "Not part of this run" in html
    dense = make_results(created=T0)
    dense.pop("routers")
    dense.pop("roundtrip")
    dense.pop("layer_types")
    dense["summary"].pop("first_divergence_detail")
    html = render_run(dense, None)
    assert 'id="routers"' not in html and 'id="layers"' in html
    assert render_run({}, None).startswith("<!DOCTYPE html>")
    assert "No runs recorded yet" in render_index([])


def test_nonfinite_metrics_render(failing):
    r = json.loads(json.dumps(failing))
    r["modules"][5]["rel_l2"] = float("nan")
    r["modules"][6]["cosine"] = float("inf")
    r["summary"]["logits"]["kl_max"] = float("inf")
    html = render_run(r, failing)
    assert ">NaN<" in html and "∞" in html


# ---------------------------------------------------------------------------------------------- compare


def test_compare_flags_verdict_flip_and_growth(passing, failing):
    flags = compare(failing, passing)
    assert flags[0]["kind"] == "verdict" and flags[0]["severity"] == "regression"
    names = {(f["name"], f["mode"]) for f in flags if f["kind"] == "gate" and f["severity"] == "regression"}
    assert ("model.layers.2.self_attn", "isolated") in names  # crossed its gate
    back = compare(passing, failing)
    assert back[0]["kind"] == "verdict" and back[0]["severity"] == "improvement"
    assert compare(passing, None) == []
    assert compare(passing, make_results(created=T0)) == []  # same numbers: nothing


def test_compare_growth_threshold_and_noise_floor():
    def run(v: float, passed: bool = True, gate: float | None = 1e-2) -> dict:
        row = {"name": "m", "mode": "isolated", "rel_l2": v, "passed": passed}
        if gate is not None:
            row["gate"] = {"metric": "rel_l2", "max": gate}
        return {"case": "c", "passed": True, "modules": [row]}

    def kinds(cur: dict, prev: dict) -> list[tuple[str, str]]:
        return [(f["kind"], f["severity"]) for f in compare(cur, prev)]

    assert kinds(run(2e-3), run(1e-3)) == [("growth", "regression")]  # 2x, at 20 % of the gate
    assert kinds(run(2e-4), run(1e-4)) == [("growth", "drift")]  # 2x, at 2 % of the gate
    assert kinds(run(1.9e-3), run(1e-3)) == []
    assert compare(run(1e-15), run(0.0)) == []  # 0 -> 1e-15 is noise below the absolute floor
    from_zero = compare(run(3e-3), run(0.0))[0]
    assert from_zero["factor"] is None and "from 0" in from_zero["message"]
    assert kinds(run(float("nan")), run(1e-3)) == [("nonfinite", "regression")]
    assert kinds(run(1.5e-3, passed=False), run(1e-3)) == [("gate", "regression")]
    assert kinds(run(1e-3), run(1.5e-3, passed=False)) == [("gate", "improvement")]
    assert kinds(run(4e-3, gate=None), run(1e-3, gate=None)) == [("growth", "drift")]  # no gate: drift


def test_find_previous_matches_case_device_dtype(passing):
    older = dict(passing, created="2026-05-09T08:00:00Z")
    other_dtype = dict(passing, created="2026-05-09T08:30:00Z", dtype="bfloat16")
    other_case = dict(passing, created="2026-05-09T08:40:00Z", case="other")
    newer = dict(passing, created="2026-05-09T10:00:00Z")
    runs = [newer, other_case, other_dtype, older, passing]
    assert find_previous(passing, runs) is older
    assert find_previous(older, runs) is None


# ---------------------------------------------------------------------------------------------- storage


def test_write_run_twice_gives_two_runs_and_flags_regressions(tmp_path, passing):
    first = write_run(passing, tmp_path)
    bumped = make_results(created=T0 + timedelta(hours=1), bump={"model.layers.4.experts": 3.0})
    second = write_run(bumped, tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / "runs"
    for d in (first, second):
        assert (d / "results.json").is_file() and (d / "index.html").is_file()
    assert re.fullmatch(r"\d{8}T\d{9}Z-gemma4-text-tiny-[0-9a-f]{6}", second.name)
    stored = json.loads((first / "results.json").read_text())
    assert stored.pop("regressions") == {"previous": None, "rule": RULE, "count": 0, "drift": 0, "flags": []}
    assert stored == passing

    report = (second / "index.html").read_text()
    regs = report[report.index('id="regressions"'):report.index('id="modules"')].replace("<wbr>", "")
    # 3x on a row at ~1e-7 against a 1e-5 gate is drift, not a regression
    assert "model.layers.4.experts" in regs and "3×" in regs and "PASS → FAIL" not in regs
    assert "0 regressions, 2 drift" in regs

    index = (tmp_path / "index.html").read_text()
    assert f'href="runs/{first.name}/index.html"' in index and f'href="runs/{second.name}/index.html"' in index
    assert index.index(second.name) < index.index(first.name)  # newest first
    at = index.index(second.name)
    row = index[index.rfind("<tr", 0, at):index.index("</tr>", at)]
    assert 'data-regressions="0"' in row and "2 drift" in row and "regression<" not in row

    material = write_run(make_results(created=T0 + timedelta(minutes=90), bump={"model.layers.4.experts": 60.0}),
                         tmp_path)
    stored = json.loads((material / "results.json").read_text())["regressions"]
    assert stored["previous"]["id"] == second.name and stored["count"] == 2
    assert {(f["name"], f["mode"]) for f in stored["flags"] if f["severity"] == "regression"} == {
        ("model.layers.4.experts", "isolated"), ("model.layers.4.experts", "end_to_end")}
    assert "2 regressions" in (tmp_path / "index.html").read_text()

    third = write_run(make_results(created=T0 + timedelta(hours=2), failure="rope"), tmp_path)
    report = (third / "index.html").read_text()
    assert "verdict PASS → FAIL" in report and 'data-verdict="FAIL"' in report
    index = (tmp_path / "index.html").read_text()
    assert "verdict PASS → FAIL" in index and index.count('href="runs/') == 4


def test_run_dirs_never_collide(tmp_path, passing, monkeypatch):
    monkeypatch.setattr(store, "_stamp", lambda: "20260101T000000000Z")
    tokens = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(store, "_token", lambda: next(tokens))
    a = write_run(passing, tmp_path)
    b = write_run(passing, tmp_path)
    assert (a.name, b.name) == ("20260101T000000000Z-gemma4-text-tiny-aaaaaa",
                                "20260101T000000000Z-gemma4-text-tiny-bbbbbb")


def test_case_name_is_sanitised_in_dir(tmp_path, passing):
    d = write_run(dict(passing, case="../../etc/x y"), tmp_path)
    assert d.parent == tmp_path / "runs" and ".." not in d.name and " " not in d.name


def test_write_to_refuses_to_overwrite(tmp_path, passing, failing):
    out = tmp_path / "out"
    assert write_to(passing, out) == out
    before = (out / "results.json").read_bytes(), (out / "index.html").read_bytes()
    with pytest.raises(FileExistsError):
        write_to(failing, out)
    assert ((out / "results.json").read_bytes(), (out / "index.html").read_bytes()) == before
    (out / "results.json").unlink()
    with pytest.raises(FileExistsError):  # an index.html alone is an earlier report too
        write_to(failing, out)
    assert not list(out.glob(".*.tmp"))


def _write_after(barrier, results: dict, root: str) -> None:
    barrier.wait(timeout=30)
    write_run(results, Path(root))


@pytest.mark.skipif(sys.platform != "linux", reason="uses the fork start method")
def test_concurrent_writers_both_land(tmp_path, passing):
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_write_after, args=(barrier, dict(passing, seed=i), str(tmp_path))) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    runs = load_runs(tmp_path)
    assert sorted(r["seed"] for r in runs) == list(range(n))
    index = (tmp_path / "index.html").read_text()
    assert index.count('href="runs/') == n  # the history page was written last by someone who saw all runs
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_runs_skips_unreadable(tmp_path, passing):
    write_run(passing, tmp_path)
    broken = tmp_path / "runs" / "20260101T000000000Z-broken-000000"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    (tmp_path / "runs" / "20260101T000000001Z-in-progress-000000").mkdir()  # no results.json yet: silent
    with pytest.warns(RuntimeWarning, match="broken"):
        runs = load_runs(tmp_path)
    assert len(runs) == 1 and runs[0]["_run"]["href"].startswith("runs/")
    assert load_runs(tmp_path / "missing") == []


def test_frames(tmp_path, passing, failing):
    frame = results_frame(failing)
    assert len(frame) == len(failing["modules"])
    assert {"name", "megatron_name", "mode", "layer", "layer_type", "cosine", "rel_l2", "max_abs", "gate_metric",
            "gate_max", "floor", "ratio", "passed"} <= set(frame.columns)
    assert (~frame["passed"].astype(bool)).sum() == sum(not m["passed"] for m in failing["modules"])
    assert frame.loc[frame["name"] == "model.layers.2.self_attn", "layer_type"].iloc[0] == "full_attention"
    write_run(passing, tmp_path)
    write_run(failing, tmp_path)
    runs = runs_frame(tmp_path)
    assert list(runs["passed"]) == [False, True]  # newest first
    assert math.isclose(runs["logits_rel_l2"].iloc[0], failing["summary"]["logits"]["rel_l2"])
    assert runs["first_divergence"].iloc[0] == "model.layers.2.self_attn"


def test_rerender_rebuilds_pages_not_results(tmp_path, passing, failing):
    a = write_run(passing, tmp_path)
    b = write_run(failing, tmp_path)
    results_before = [(d / "results.json").read_bytes() for d in (a, b)]
    (a / "index.html").unlink()
    (b / "index.html").write_text("stale")
    (tmp_path / "index.html").unlink()
    assert rerender(tmp_path) == 2
    assert "verdict PASS → FAIL" in (b / "index.html").read_text()  # previous run found again
    assert (a / "index.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "index.html").is_file()
    assert [(d / "results.json").read_bytes() for d in (a, b)] == results_before
    assert rerender(tmp_path / "empty") == 0 and (tmp_path / "empty" / "index.html").is_file()


def test_report_cli_main(tmp_path, passing, capsys):
    from parity.report.cli import main
    write_run(passing, tmp_path)
    assert main(["--dir", str(tmp_path)]) == 0
    assert "re-rendered 1 run" in capsys.readouterr().out
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["--dir", str(f)]) == 2


# ---------------------------------------------------------------------------------------------- since when


def test_run_page_links_history_previous_last_pass_and_failing_since(tmp_path):
    dirs = [write_run(make_results(created=T0 + timedelta(hours=h), failure=f), tmp_path)
            for h, f in ((0, None), (1, None), (2, "rope"), (3, "rope"))]
    other = write_run(make_results(created=T0 + timedelta(hours=4), dtype="bfloat16"), tmp_path)  # other group
    last = (dirs[3] / "index.html").read_text()
    nav = last[last.index('<div class="since">'):last.index("</nav>")]
    assert 'href="../../index.html" id="link-history"' in nav
    assert f'href="../{dirs[2].name}/index.html" id="link-previous"' in nav
    assert f'href="../{dirs[1].name}/index.html" id="link-last-pass"' in nav
    assert f'href="../{dirs[2].name}/index.html" id="link-failing-since"' in nav and "(2 runs)" in nav
    assert other.name not in last
    third = (dirs[2] / "index.html").read_text()
    assert "failing since this run" in third and f'../{dirs[1].name}/index.html" id="link-last-pass"' in third
    first = (dirs[0] / "index.html").read_text()
    assert 'id="link-history"' in first and 'id="link-previous"' not in first and "failing since" not in first
    for d in dirs:  # every link points at a page that exists
        html = (d / "index.html").read_text()
        for href in re.findall(r'<a href="(\.\./[^"#]+)" id="link-', html):
            assert (d / href).resolve().is_file(), href
    rerender(tmp_path)  # the re-rendered page keeps its links
    assert f'href="../{dirs[1].name}/index.html" id="link-last-pass"' in (dirs[3] / "index.html").read_text()


def test_failing_page_opens_on_failing_rows_with_the_first_divergence_linked(passing, failing):
    html = render_run(failing, None)
    table = html[html.index('id="modules"'):html.index('id="routers"')]
    assert 'class="sortable fixed failonly" id="modtable"' in table and 'data-failonly="modtable" checked' in table
    fd = failing["summary"]["first_divergence_detail"]
    row = table[table.rfind("<tr", 0, table.index('id="fd-row"')):]
    row = row[:row.index("</tr>")]
    assert 'class="bad fd"' in row and ">isolated<" in row
    assert fd["name"] == re.sub(r"<[^>]+>", "", re.search(r'<td class="name">(.*?)</td>', row).group(1))
    card = html[html.index('id="first-divergence"'):html.index('id="worst-layer"')]
    assert 'href="#fd-row"' in card
    ok = render_run(passing, None)
    assert 'id="fd-row"' not in ok and 'class="sortable fixed" id="modtable"' in ok and " checked" not in ok


def test_megatron_names_wrap_at_dots_not_mid_word(failing):
    from parity.report.page import CSS
    html = render_run(failing, None)
    assert "decoder.<wbr>layers.<wbr>3.<wbr>self_attention.<wbr>linear_qkv<wbr>[q]" in html
    rule = re.search(r"td\.name\{([^}]*)\}", CSS).group(1)
    assert "anywhere" not in rule and "break-all" not in rule


def test_regressions_table_shows_growth_from_zero():
    def run(v, created):
        return {"case": "c", "passed": True, "created": created, "modules": [
            {"name": "model.layers.0.mlp", "megatron_name": "decoder.layers.0.mlp", "mode": "isolated",
             "rel_l2": v, "gate": {"metric": "rel_l2", "max": 1e-5}, "passed": True}]}
    html = render_run(run(5e-6, "2026-05-09T10:00:00Z"), run(0.0, "2026-05-09T09:00:00Z"))
    regs = html[html.index('id="regressions"'):html.index('id="modules"')]
    assert ">from 0<" in regs and "50.00 %" in regs and "1 regression," in regs


def test_heatmap_marks_gate_use_per_layer_and_module_one_map_per_mode_isolated_first(passing, failing):
    """One map per mode, the isolated replay on top: its 4 red cells (the two full-attention self_attn and their
    layers) point at the cause; the end-to-end map below has 65, which a max over both modes painted into one."""
    from parity.report.heatmap import cells, colour
    html = render_run(failing, None)
    heat = html[html.index('id="heatmap"'):html.index('id="regressions"')]
    types, layers, grid = cells(failing, "text", "isolated")
    assert layers == list(range(6)) and types[-1] == "(layer output)" and types[0] == "input_layernorm"
    assert heat.index('id="heat-text-isolated"') < heat.index('id="heat-text-end_to_end"')
    assert heat.index('id="heatmap-isolated">isolated · <span class="red">4 failing</span>') < \
        heat.index('id="heatmap-end_to_end">end-to-end · <span class="red">')

    def over(mode: str) -> list[str]:
        table = heat[heat.index(f'id="heat-text-{mode}"'):]
        table = table[:table.index("</table>")]
        assert table.count("<tr>") == len(cells(failing, "text", mode)[0]) + 1
        return re.findall(r'<td class="over" title="([^"&]+)', table)

    assert sorted(over("isolated")) == ["model.layers.2", "model.layers.2.self_attn", "model.layers.5",
                                        "model.layers.5.self_attn"]
    assert len(over("end_to_end")) == 65 and not any(n.startswith(("model.layers.0.", "model.layers.1."))
                                                     for n in over("end_to_end"))
    full = [i for i, t in enumerate(failing["layer_types"]) if t == "full_attention"]
    assert heat.count('<th class="full"') == 2 * len(full)
    assert 'class="over"' not in render_run(passing, None).split('id="heatmap"')[1].split('id="regressions"')[0]
    assert colour(1e-7) == colour(1e-6) != colour(0.05) != colour(0.5)


def test_a_failing_streak_shows_how_long_and_what_changed_since_the_last_pass(tmp_path):
    """The strip's tile says "failing since: 2 runs" (not a green "0 regressions" against a failing run), and a
    card lists the commit range, package versions and environment that differ from the last passing run."""
    good = make_results(created=T0, git_commit="a" * 40)
    write_run(good, tmp_path)
    bad1 = make_results(created=T0 + timedelta(hours=1), failure="rope", git_commit="b" * 40)
    bad1["env"].update(torch="2.14.0+cpu", host="ci-runner-2")
    first = write_run(bad1, tmp_path)
    bad2 = make_results(created=T0 + timedelta(hours=2), failure="rope", git_commit="c" * 40)
    bad2["env"].update(torch="2.14.0+cpu", host="ci-runner-2", git_dirty=True)
    last = write_run(bad2, tmp_path)
    html = (last / "index.html").read_text()
    record = json.loads((last / "results.json").read_text())["regressions"]
    assert record["count"] == 0  # against the previous (failing) run: nothing new ...
    strip = html[html.index('<div class="strip">'):]
    strip = strip[:strip.index("</section>")]
    assert "regressions vs previous" not in strip  # ... so the tile no longer says a green 0
    assert f'<div class="tile bad"><div class="k">failing since</div><div class="v"><span id="streak" data-runs="2">' \
           f'<a href="../{first.name}/index.html" style="color:inherit">2 runs</a></span><small> · 2026-05-09 10:00' \
           in strip
    card = html[html.index('id="changed"'):]
    card = card[:card.index("</ul>")]
    items = re.findall(r'<li data-kind="(\w+)"><b>([^<]+)</b> (.*?)</li>', card)
    assert [(k, w, re.sub(r"<[^>]+>", "", v)) for k, w, v in items] == [
        ("commit", "commit", f"{'a' * 12} → {'c' * 12} (dirty)"),
        ("package", "torch", "2.13.0+cpu → 2.14.0+cpu"),
        ("environment", "host", "ci-runner-1 → ci-runner-2")]
    assert html.index('id="first-divergence"') < html.index('id="changed"') < html.index('id="heatmap"')
    second = (first / "index.html").read_text()
    assert 'data-runs="1">1 run</span><small> · this run' in second
    ok = sorted((tmp_path / "runs").iterdir())[0]
    assert 'id="changed"' not in (ok / "index.html").read_text()
    never = tmp_path / "never"
    write_run(make_results(created=T0, failure="rope"), never)
    assert "no passing run of this case, system, device and dtype in the history" in \
        next((never / "runs").iterdir()).joinpath("index.html").read_text()


def test_history_lists_corrupt_runs_and_offers_filters_and_pages(tmp_path, passing):
    write_run(passing, tmp_path)
    broken = tmp_path / "runs" / "20260101T000000000Z-broken-000000"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    write_run(make_results(created=T0 + timedelta(hours=1), failure="rope"), tmp_path)
    index = (tmp_path / "index.html").read_text()
    assert "CORRUPT" in index and broken.name in index and "1 corrupt" in index
    assert f'href="runs/{broken.name}/results.json"' in index
    for name in ("case", "system", "verdict", "regressions"):
        assert f'data-hfilter="{name}"' in index
    assert f'data-pager="runs" data-size="{200}"' in index
    assert index.count('data-case="gemma4-text-tiny"') == 2 and 'data-verdict="corrupt"' in index


def test_run_key_separates_systems(passing):
    bridge = dict(passing, system={"name": "megatron-bridge", "version": "0.3"}, created="2026-05-09T10:00:00Z")
    ours = dict(passing, created="2026-05-09T11:00:00Z")
    assert find_previous(ours, [bridge, passing]) is passing
    assert find_previous(bridge, [ours, passing]) is None


# ---------------------------------------------------------------------------------------------- one line


def test_summary_line_has_verdict_divergence_regressions_report_and_history(tmp_path):
    from parity.report.oneline import summary_line
    write_run(make_results(created=T0), tmp_path)
    d = write_run(make_results(created=T0 + timedelta(hours=1), failure="rope"), tmp_path)
    r = json.loads((d / "results.json").read_text())
    line = summary_line(r, d / "index.html", tmp_path / "index.html")
    assert "\n" not in line
    assert line.startswith("gemma4-text-tiny on cpu in float32: parity FAILS (logits, modules, router, roundtrip "
                           "failed) · first divergence: "
                           "model.layers.2.self_attn = megatron decoder.layers.2.self_attention (isolated; rel_l2 ")
    assert f"regressions: {r['regressions']['count']} · report: {d / 'index.html'} · history: " in line
    assert r["regressions"]["count"] > 0
    first = summary_line(make_results(created=T0), None, None)
    assert "parity HOLDS · first divergence: none · regressions: no history (--out)" in first


def test_environment_shows_dirty_commit_threads_and_third_party_notices(passing):
    r = json.loads(json.dumps(passing))
    r["env"].update({"git_dirty": True, "threads": 1, "command": "python -m parity run --case x",
                     "warnings": ["UserWarning: Transformer Engine and Apex are not installed. (megatron/x.py:1)"]})
    html = render_run(r, None)
    env = html[html.index('id="provenance"'):]
    assert ">dirty</span>" in env and "<dt>threads</dt><dd>1</dd>" in env
    assert "1 third-party warning</summary>" in env and "Transformer Engine and Apex are not installed" in env
    assert "(dirty)" in html[:html.index("</header>")]
    r["env"]["git_dirty"] = False
    assert ">dirty</span>" not in render_run(r, None)


def test_ctrl_c_while_a_report_is_written_waits_until_it_is_whole(tmp_path, passing, monkeypatch):
    """SIGINT in the middle of ``write_run`` / ``write_to``: the run folder gets both files and the history lists
    it; the interrupt is delivered afterwards (here: pytest's KeyboardInterrupt)."""
    import signal

    from parity.report import store

    dumps = store.dumps

    def interrupted(results):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C between creating the folder and writing results.json
        return dumps(results)

    monkeypatch.setattr(store, "dumps", interrupted)
    # the handler in force is Python's own (a KeyboardInterrupt), whatever an earlier test in this xdist worker left
    # installed: one full CI-like run (2026-12-05) saw the held interrupt delivered to a handler that did not raise
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_run(passing, tmp_path / "root")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler restored after the block
        (run,) = (tmp_path / "root" / "runs").iterdir()
        assert sorted(f.name for f in run.iterdir()) == ["index.html", "results.json"]
        assert json.loads((run / "results.json").read_text())["case"] == passing["case"]
        assert run.name in (tmp_path / "root" / "index.html").read_text()
        with pytest.raises(KeyboardInterrupt):
            write_to(passing, tmp_path / "out")
        assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["index.html", "results.json"]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_lora_section_lists_each_adapter_tensor_with_its_export_gradient_and_merged_weight():
    from parity.report.lora import section

    rows = [{"name": "model.layers.0.self_attn.q_proj.lora_A.weight", "mode": "adapter_export", "passed": True,
             "max_abs": 0.0, "gate": {"metric": "max_abs", "max": 0.0}},
            {"name": "model.layers.2.self_attn.v_proj.lora_A.weight", "mode": "adapter_export", "passed": False,
             "missing": "exported by x for a module HF has no adapter on"},
            {"name": "model.layers.0.self_attn.q_proj.lora_A.default.weight", "mode": "param_grad", "passed": True,
             "rel_l2": 1.2e-6, "gate": {"metric": "rel_l2", "max": 1e-5}},
            {"name": "model.layers.0.self_attn.q_proj.weight", "mode": "adapter_merged", "passed": True,
             "rel_l2": 0.0, "gate": {"metric": "rel_l2", "max": 1e-5}}]
    html = section({"modules": rows, "lora": {"targets": ["q_proj"], "r": 4, "alpha": 8.0, "scale": 2.0,
                                              "export": {"hf": 1, "exported": 2, "bit_exact": 1, "extra": ["v"]},
                                              "export_loads": True}})
    assert html.count("<tr><td><code>") == 2 and "rel_l2 1.2e-6" in html and "has no adapter on" in html
    assert "2 exported / 1 of peft" in html and "extra: v" in html
    assert section({"modules": rows}) == ""
