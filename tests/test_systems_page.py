"""The systems side-by-side page: shared reference, one card per system, worst rows, disagreements."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from parity.report.summary import fmt, fmt_pct
from parity.report.systems import CAP, disagreements, render_systems, write_systems

_spec = importlib.util.spec_from_file_location("make_results", Path(__file__).parent / "fixtures" / "make_results.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_results = _fixtures.make_results

CASE = "gemma4-text-tiny"


def row(name: str, mode: str, rel: float | None, limit: float = 1e-5, order: int = 0, **extra) -> dict:
    """A module row gated on rel_l2 (``limit``); ``rel=None`` with ``gate=None`` is a row not compared."""
    r = {"name": name, "megatron_name": "decoder." + name.removeprefix("model."), "mode": mode, "kind": "linear",
         "cosine": None if rel is None else 1 - rel * rel / 2, "rel_l2": rel, "max_abs": rel,
         "gate": {"metric": "rel_l2", "max": limit}, "passed": rel is not None and rel <= limit, "order": order}
    r.update(extra)
    return r


def results(system: str, rows: list[dict], **extra) -> dict:
    failing = [r for r in rows if r["passed"] is False]
    fd = failing[0] if failing else None
    out = {
        "case": CASE, "device": "cpu", "dtype": "float32", "seed": 7, "config_hash": "c0ffee1234", "passed": not fd,
        "env": {"transformers": "5.24.0", "device_name": "cpu"},
        "system": {"name": system, "version": "1.2.3", "substituted": []},
        "summary": {"first_divergence": fd and fd["name"],
                    "first_divergence_detail": fd and {"name": fd["name"], "megatron_name": fd["megatron_name"],
                                                       "mode": fd["mode"], "metric": "rel_l2",
                                                       "value": fd["rel_l2"], "gate": fd["gate"]},
                    "logits": {"kl_max": 2.5e-9, "top1_agreement": 0.984375}},
        "modules": rows,
        "roundtrip": {"tensors": 40, "bit_exact": 40, "max_abs_diff": 0.0},
    }
    out.update(extra)
    return out


def two_systems() -> list[tuple[str, dict, str]]:
    """parity passes everything; the bridge fails q_proj isolated, lacks the mlp row and reports o_proj as not
    compared; its attention output is the worst row it has."""
    ours = [row("model.layers.0.self_attn.q_proj", "isolated", 2e-7, order=1),
            row("model.layers.0.self_attn.o_proj", "end_to_end", 3e-7, order=2),
            row("model.layers.0.mlp", "isolated", 4e-7, order=3),
            row("model.layers.0.self_attn", "isolated", 1e-7, order=2)]
    bridge = [row("model.layers.0.self_attn.q_proj", "isolated", 0.0421, order=1),
              row("model.layers.0.self_attn.o_proj", "end_to_end", None, order=0, gate=None, passed=True,
                  detail="fused into linear_proj: compared at model.layers.0.self_attn"),
              row("model.layers.0.self_attn", "isolated", 9e-6, order=2)]
    b = results("megatron-bridge", bridge, roundtrip={"tensors": 40, "bit_exact": 39, "max_abs_diff": 1e-3})
    b["system"].update(version="0.4.0", substituted=[{"part": "TE linear", "by": "torch linear", "reason": "CPU"},
                                                     {"part": "TE norm", "by": "torch norm", "reason": "CPU"}])
    return [("parity", results("parity", ours), "parity/index.html"),
            ("megatron-bridge", b, "megatron-bridge/index.html")]


def card(html: str, i: int) -> str:
    start = html.index(f'id="sys-{i}"')
    return html[start:html.index("full report", start)]


def section(html: str, sid: str) -> str:
    start = html.index(f'<section id="{sid}"')
    return html[start:html.index("</section>", start)]


def tr_of(table: str, name: str, mode: str) -> str:
    """The table row of HF module ``name`` in ``mode`` (names are written with <wbr> after each dot)."""
    for tr in re.findall(r"<tr.*?</tr>", table, re.S):
        if f">{name.replace('.', '.<wbr>')}<" in tr and f"<td>{mode}</td>" in tr:
            return tr
    raise AssertionError(f"no row {name} {mode}")


def test_header_and_cards_show_each_systems_numbers():
    runs = two_systems()
    runs[1][1]["summary"]["first_divergence_detail"]["why"] = "accuracy: 0.04 from HF-fp32"
    html = render_systems(CASE, runs)
    assert 'data-verdict="FAIL"' in html and "<title>FAIL · gemma4-text-tiny · 2 systems</title>" in html
    ref = section(html, "reference")
    for text in (CASE, "c0ffee1234", "<dd>7</dd>", "5.24.0", "float32", "cpu"):
        assert text in ref, text
    assert "differs" not in ref
    ours, bridge = card(html, 0), card(html, 1)
    assert 'data-system="parity"' in ours and "parity HOLDS" in ours and "1.2.3" in ours
    assert "<dt>first divergence</dt><dd>none</dd>" in ours and "<dt>rows failing</dt><dd><b class=\"green\">0<" in ours
    assert "<dt>rows compared</dt><dd>4</dd>" in ours and "40 / 40 bit-exact" in ours
    assert f"<dd>{fmt(2.5e-9)}</dd>" in ours and f"<dd>{fmt_pct(0.984375)}</dd>" in ours
    assert 'data-system="megatron-bridge"' in bridge and "parity FAILS" in bridge and "0.4.0" in bridge
    assert "model.<wbr>layers.<wbr>0.<wbr>self_attn.<wbr>q_proj" in bridge
    assert f'isolated · rel_l2 <b class="red mono">{fmt(0.0421)}</b> · gate rel_l2 ≤ 1e-5' in bridge
    assert '<div class="why red" style="max-width:none">accuracy: 0.04 from HF-fp32</div>' in bridge
    assert "<dt>rows compared</dt><dd>2 <span" in bridge and "(+1 not compared)" in bridge
    assert '<b class="red">1</b>' in bridge and '<span class="red">39 / 40 bit-exact' in bridge
    assert "2 parts" in bridge and "TE linear → torch linear (CPU)" in bridge


def test_worst_rows_are_ranked_by_use_of_the_gate_per_system():
    html = render_systems(CASE, two_systems())
    worst = section(html, "worst")
    split = worst.rindex("<tr", 0, worst.index("<b>megatron-bridge</b>"))  # the bridge's first row
    ours, bridge = worst[:split], worst[split:]
    # parity: mlp 4e-7/1e-5 before q_proj 2e-7/1e-5 before self_attn 1e-7/1e-5; o_proj uses 3e-7/1e-5
    names = re.findall(r'<td class="name">(.*?)</td>', ours)
    assert [n.replace("<wbr>", "") for n in names] == [
        "model.layers.0.mlp", "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn"]
    assert f"rel_l2 {fmt(4e-7)}" in ours and f"{fmt(0.04)}×" in ours
    names = [n.replace("<wbr>", "") for n in re.findall(r'<td class="name">(.*?)</td>', bridge)]
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn"]  # o_proj has no gate: not ranked
    assert f"{fmt(0.0421 / 1e-5)}×" in bridge and bridge.startswith('<tr class="bad">')


def test_worst_rows_keep_five_per_system():
    rows = [row(f"model.layers.{i}", "isolated", i * 1e-7, order=i) for i in range(9)]
    html = render_systems(CASE, [("parity", results("parity", rows), "p/index.html")])
    names = [n.replace("<wbr>", "") for n in re.findall(r'<td class="name">(.*?)</td>', section(html, "worst"))]
    assert names == [f"model.layers.{i}" for i in (8, 7, 6, 5, 4)]


def test_disagreement_lists_both_systems_values_and_rows_one_system_lacks():
    runs = two_systems()
    table = section(render_systems(CASE, runs), "disagree")
    heads = re.findall(r"<th>(.*?)</th>", table)
    assert heads == ["HF module", "mode", "parity", "megatron-bridge", "difference"]
    q = tr_of(table, "model.layers.0.self_attn.q_proj", "isolated")
    cells = re.findall(r"<td.*?>(.*?)</td>", q, re.S)
    assert 'pill ok' in cells[2] and f"rel_l2 {fmt(2e-7)}" in cells[2]
    assert 'pill no' in cells[3] and f"rel_l2 {fmt(0.0421)}" in cells[3] and "rel_l2 ≤ 1e-5" in cells[3]
    assert cells[4] == "fails in megatron-bridge; passes in parity" and q.startswith('<tr class="bad">')
    mlp = re.findall(r"<td.*?>(.*?)</td>", tr_of(table, "model.layers.0.mlp", "isolated"), re.S)
    assert f"rel_l2 {fmt(4e-7)}" in mlp[2] and "not compared" in mlp[3] and "no row" in mlp[3]
    assert mlp[4] == "not compared by megatron-bridge"
    o = re.findall(r"<td.*?>(.*?)</td>", tr_of(table, "model.layers.0.self_attn.o_proj", "end-to-end"), re.S)
    assert "compared at model.layers.0.self_attn" in o[3] and o[4] == "not compared by megatron-bridge"
    assert "model.<wbr>layers.<wbr>0.<wbr>self_attn<" not in table  # both pass: no disagreement
    # failing first, then in HF order; o_proj's order (2) is the one of the system comparing it, not 0
    assert [(d["name"].rsplit(".", 1)[-1], d["mode"]) for d in disagreements(runs)] == [
        ("q_proj", "isolated"), ("o_proj", "end_to_end"), ("mlp", "isolated")]


def test_disagreements_are_capped_and_counted():
    a = results("parity", [row(f"model.layers.{i}", "isolated", 1e-7, order=i) for i in range(CAP + 7)])
    b = results("megatron-bridge", [row(f"model.layers.{i}", "isolated", 1e-3, order=i) for i in range(CAP + 7)])
    html = render_systems(CASE, [("parity", a, "a/index.html"), ("megatron-bridge", b, "b/index.html")])
    table = section(html, "disagree")
    assert table.count('<tr class="bad">') == CAP and f"{CAP + 7} rows (first {CAP} shown)" in table
    assert '<p class="muted" id="disagree-more">7 more rows not shown' in table
    assert ">model.<wbr>layers.<wbr>0<" in table and f">model.<wbr>layers.<wbr>{CAP}<" not in table


def test_one_system_and_missing_optional_keys():
    html = render_systems(CASE, [("parity", results("parity", [row("model.norm", "isolated", 1e-6)]),
                                  "parity/index.html")])
    assert 'data-verdict="PASS"' in html and "1 / 1" in html and "parity HOLDS" in html
    assert "Fewer than two systems" in section(html, "disagree")
    bare = render_systems(CASE, [("a", {}, "a/index.html"), ("b", {"modules": [{"name": "x"}]}, "b/index.html")])
    assert 'data-verdict="N/A"' in bare and "no verdict" in bare and "not run" in bare
    assert "no gated rows" in section(bare, "worst")
    assert "None: every row has the same verdict" in section(bare, "disagree")


def test_a_different_reference_is_flagged():
    runs = two_systems()
    runs[1][1]["config_hash"] = "deadbeef"
    ref = section(render_systems(CASE, runs), "reference")
    assert "c0ffee1234 / deadbeef" in ref and "differs" in ref


def test_strings_are_escaped_and_links_relative():
    runs = two_systems()
    evil = "<script>alert(1)</script>"
    runs[1][1]["modules"][0]["name"] = f"model.{evil}"
    runs[1][1]["modules"][0]["why"] = evil
    runs[1][1]["system"]["version"] = evil
    runs[1][1]["env"]["transformers"] = evil
    runs.append(('sys"<b>', results("x", []), 'x"y/index.html'))
    html = render_systems(f"case{evil}", runs)
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'data-system="sys&quot;&lt;b&gt;"' in html and 'href="x&quot;y/index.html"' in html
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert {"parity/index.html", "megatron-bridge/index.html"} <= set(hrefs)
    assert all(not re.match(r"^[a-z][a-z0-9+.-]*:|^/", h) for h in hrefs), hrefs
    assert html.count("<script") == 1 and "<link" not in html and "http" not in html


def test_tables_fit_a_narrow_window():
    """Long names wrap: every table on the page has a fixed layout and wraps anywhere."""
    html = render_systems(CASE, two_systems())
    assert html.count("<table") == html.count('<table class="fixed"') == 2
    assert "table.fixed{table-layout:fixed}" in html and "overflow-wrap:anywhere" in html


def test_write_systems_writes_only_index_html(tmp_path):
    for name in ("parity", "megatron-bridge"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "index.html").write_text(name)
    (tmp_path / "index.html").write_text("old")
    path = write_systems(tmp_path, CASE, two_systems())
    assert path == tmp_path / "index.html" and "megatron-bridge" in path.read_text()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "index.html", "megatron-bridge", "megatron-bridge/index.html", "parity", "parity/index.html"]
    assert (tmp_path / "parity" / "index.html").read_text() == "parity"


@pytest.mark.parametrize("failure", [None, "rope"])
def test_realistic_runs_render(failure):
    """Two fixture runs (the bridge's with the RoPE bug): every failing row is a disagreement."""
    a, b = make_results(), make_results(failure=failure)
    runs = [("parity", a, "parity/index.html"), ("megatron-bridge", b, "megatron-bridge/index.html")]
    found = disagreements(runs)
    assert len(found) == sum(1 for r in b["modules"] if not r["passed"])
    assert all(d["states"] == ["pass", "fail"] for d in found)
    html = render_systems(CASE, runs)
    assert ("parity FAILS" in html) == (failure is not None)


_bspec = importlib.util.spec_from_file_location("browser_probe", Path(__file__).parent / "test_browser.py")
_browser = importlib.util.module_from_spec(_bspec)
_bspec.loader.exec_module(_browser)

WIDTH = """
  out.sw = document.documentElement.scrollWidth;
  out.wide = [].filter.call(document.querySelectorAll('.card,.tablewrap'), function(e){
    return e.scrollWidth > e.clientWidth + 1; }).map(function(e){ return e.id || e.className; });
"""


@pytest.mark.skipif(_browser.CHROMIUM is None, reason="needs Debian's headless chromium")
def test_four_systems_fit_1280px_in_a_browser(tmp_path):
    long = "model.language_model.layers.29.post_feedforward_layernorm_2_and_a_deliberately_long_suffix"
    runs = []
    for i, name in enumerate(("parity", "megatron-bridge-with-a-rather-long-system-name", "c", "d")):
        rows = [row(long, "fp32_replay", 1e-7 * 10 ** i, order=1), row("model.norm", "isolated", 1e-7, order=2)]
        runs.append((name, results(name, rows), f"{name}/index.html"))
    path = write_systems(tmp_path, CASE, runs)
    out = _browser.probe(path, WIDTH, tmp_path)
    assert out["errors"] == [] and out["vw"] == 1280, out
    assert out["sw"] <= 1280 and out["wide"] == [], out


def test_missing_reference_values_are_not_a_difference():
    runs = two_systems()
    del runs[1][1]["seed"], runs[1][1]["env"]
    ref = section(render_systems(CASE, runs), "reference")
    assert "<dd>7</dd>" in ref and "<dd>5.24.0</dd>" in ref and "differs" not in ref
