"""The reports in a real browser (Debian's headless Chromium): the pass, fail and history pages load without
console errors, the first screen (1280x800) holds the verdict and the first divergence, a failing page opens
on its failing rows with the first divergence scrolled into view, filters hide empty group headers, and the
history pages past 200 runs and filters by case, system and verdict.

A probe script is injected at the top of a *copy* of each page: it records uncaught errors and
``console.error`` calls from the page's own script, then, on ``load``, measures and acts on the page and
writes its findings into the DOM, which ``chromium --dump-dom`` prints. Install Chromium with
``bash scripts/setup-browser.sh`` (root: ``apt-get install -y chromium``); without it these tests skip.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from parity.report import render_index
from parity.report.store import write_run, write_to

_spec = importlib.util.spec_from_file_location("make_results", Path(__file__).parent / "fixtures" / "make_results.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
make_results = _fixtures.make_results

T0 = datetime(2026, 5, 9, 9, 0, tzinfo=timezone.utc)
CHROMIUM = next((Path(p) for p in (shutil.which("chromium") or "", "/usr/bin/chromium") if p and Path(p).exists()),
                None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's headless chromium (bash "
                                "scripts/setup-browser.sh, or apt-get install -y chromium as root)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--window-size=1280,800"]

# Runs first: collects errors; ``PROBE_BODY`` (a function body using ``out``) runs on load.
_PROBE = """<script>
(function(){
  var errors = [];
  window.addEventListener('error', function(e){ errors.push(String(e.message || e)); });
  var ce = console.error; console.error = function(){ errors.push([].join.call(arguments, ' ')); ce.apply(console, arguments); };
  function inView(el){  // inside the first 1280x800 of the page (headless windows may report a shorter viewport)
    if(!el) return false;
    var r = el.getBoundingClientRect();
    return r.height > 0 && r.top + window.scrollY >= 0 && r.bottom + window.scrollY <= 800 && r.right <= 1280;
  }
  function visible(el){ return !!el && el.getClientRects().length > 0; }
  window.addEventListener('load', function(){
    var out = {vw: window.innerWidth, vh: window.innerHeight, js: document.documentElement.getAttribute('data-js')};
    try { (function(out, inView, visible){ %BODY% })(out, inView, visible); }
    catch(e){ errors.push('probe: ' + e); }
    out.errors = errors;
    document.body.setAttribute('data-probe', JSON.stringify(out));
  });
})();
</script>"""


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def probe(page: Path, body: str, tmp_path: Path) -> dict:
    """Load a copy of ``page`` with the probe and return what it found (``errors``: console errors)."""
    html = page.read_text(encoding="utf-8")
    copy = page.with_name(f".probe-{page.name}")
    copy.write_text(html.replace("<head>", "<head>" + _PROBE.replace("%BODY%", body), 1), encoding="utf-8")
    dom = _chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", copy.as_uri()], tmp_path)
    m = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert m, dom.stderr[-3000:]
    out = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    out["console"] = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    return out


FIRST_SCREEN = """
  ['verdict','first-divergence','worst-layer','logits-card'].forEach(function(id){
    out[id] = inView(document.getElementById(id));
  });
  out.scrollY = window.scrollY;
  var t = document.getElementById('modtable');
  out.failonly = t.classList.contains('failonly');
  out.shown = [].filter.call(t.tBodies[0].rows, function(r){ return !r.classList.contains('grp') && visible(r); }).length;
  out.shownBad = [].filter.call(t.tBodies[0].rows, function(r){ return r.classList.contains('bad') && visible(r); }).length;
  var fd = document.getElementById('fd-row');
  if (fd) {
    var w = fd.closest('.tablewrap').getBoundingClientRect(), r = fd.getBoundingClientRect();
    out.fdInTable = r.top >= w.top && r.bottom <= w.bottom;
    out.fdText = fd.cells[0].textContent + ' ' + fd.cells[2].textContent;
  }
  var since = document.querySelector('nav.toc .since');
  out.since = since ? [].map.call(since.children, function(a){ return inView(a) ? a.id : '!' + a.id; }) : [];
"""


def _pages(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A history of pass, pass, fail (written through the store, so with links) and its pages."""
    root = tmp_path / "reports"
    ok = write_run(make_results(created=T0), root)
    write_run(make_results(created=T0 + timedelta(hours=1)), root)
    bad = write_run(make_results(created=T0 + timedelta(hours=2), failure="rope"), root)
    return ok / "index.html", bad / "index.html", root / "index.html"


def test_passing_page_first_screen(tmp_path):
    ok, _, _ = _pages(tmp_path)
    out = probe(ok, FIRST_SCREEN, tmp_path)
    assert out["errors"] == [] and out["console"] == [] and out["js"] == "ok", out
    assert out["vw"] == 1280
    assert all(out[k] for k in ("verdict", "first-divergence", "worst-layer", "logits-card")), out
    assert out["failonly"] is False and out["shownBad"] == 0 and out["shown"] > 100
    assert out["since"] == ["link-history"], out


def test_failing_page_opens_on_failing_rows_scrolled_to_the_first_divergence(tmp_path):
    _, bad, _ = _pages(tmp_path)
    out = probe(bad, FIRST_SCREEN, tmp_path)
    assert out["errors"] == [] and out["console"] == [], out
    assert all(out[k] for k in ("verdict", "first-divergence", "worst-layer", "logits-card")), out
    assert out["scrollY"] == 0  # the page itself stays on its first screen
    assert out["failonly"] and out["shown"] == out["shownBad"] > 0, out
    assert out["fdInTable"] and out["fdText"] == "model.layers.2.self_attn isolated", out
    assert out["since"] == ["link-history", "link-previous", "link-last-pass", "link-failing-since"], out


def test_filtering_hides_group_headers_left_empty(tmp_path):
    _, bad, _ = _pages(tmp_path)
    body = """
  var t = document.getElementById('modtable'), cb = document.querySelector('[data-failonly="modtable"]');
  cb.checked = false; cb.dispatchEvent(new Event('change'));
  var inp = document.querySelector('[data-filter="modtable"]');
  inp.value = 'experts'; inp.dispatchEvent(new Event('input'));
  var rows = [].slice.call(t.tBodies[0].rows), empty = 0, groups = 0, shown = [];
  rows.forEach(function(r, i){
    if (!r.classList.contains('grp') || !visible(r)) { if (visible(r)) shown.push(r.cells[0].textContent); return; }
    groups++;
    var j = i + 1, any = false;
    while (j < rows.length && !rows[j].classList.contains('grp')) { if (visible(rows[j])) any = true; j++; }
    if (!any) empty++;
  });
  out.groups = groups; out.empty = empty; out.shown = shown;
"""
    out = probe(bad, body, tmp_path)
    assert out["errors"] == [], out
    assert out["empty"] == 0 and out["groups"] == 6, out  # one header per layer that has an experts row
    assert out["shown"] and all("experts" in s for s in out["shown"]), out


def test_history_page_loads_and_its_filters_work(tmp_path):
    _, _, index = _pages(tmp_path)
    body = """
  var t = document.getElementById('runs');
  function shown(){ return [].filter.call(t.tBodies[0].rows, visible).map(function(r){ return r.getAttribute('data-verdict'); }); }
  out.all = shown();
  var v = document.querySelector('[data-hfilter="verdict"]'); v.value = 'FAIL'; v.dispatchEvent(new Event('change'));
  out.fail = shown();
  out.table = inView(document.querySelector('#runs tbody tr'));
"""
    out = probe(index, body, tmp_path)
    assert out["errors"] == [] and out["console"] == [], out
    assert out["all"] == ["FAIL", "PASS", "PASS"] and out["fail"] == ["FAIL"] and out["table"], out


def test_history_pages_past_200_runs(tmp_path):
    runs = []
    for i in range(450):
        r = make_results(created=T0 + timedelta(minutes=i), case="gemma4-text-tiny" if i % 3 else "other-case",
                         failure="roundtrip" if i % 10 == 0 else None)
        r["_run"] = {"id": f"run{i:04d}", "href": f"runs/run{i:04d}/index.html"}
        runs.append(r)
    page = tmp_path / "index.html"
    page.write_text(render_index(runs, [{"id": "broken", "href": "runs/broken/results.json", "error": "bad"}]))
    body = """
  var t = document.getElementById('runs'), info = document.querySelector('.pageinfo');
  function count(){ return [].filter.call(t.tBodies[0].rows, visible).length; }
  out.first = [count(), info.textContent];
  document.querySelector('[data-page="1"]').click(); document.querySelector('[data-page="1"]').click();
  out.last = [count(), info.textContent, document.querySelector('[data-page="1"]').disabled];
  var c = document.querySelector('[data-hfilter="case"]'); c.value = 'other-case'; c.dispatchEvent(new Event('change'));
  out.other = [count(), info.textContent];
  var v = document.querySelector('[data-hfilter="verdict"]'); v.value = 'corrupt'; c.value = '';
  v.dispatchEvent(new Event('change'));
  out.corrupt = [count(), info.textContent];
"""
    out = probe(page, body, tmp_path)
    assert out["errors"] == [], out
    assert out["first"] == [200, "page 1 of 3 · 451 runs"], out
    assert out["last"] == [51, "page 3 of 3 · 451 runs", True], out
    assert out["other"] == [150, "page 1 of 1 · 150 runs"], out
    assert out["corrupt"] == [1, "page 1 of 1 · 1 run"], out


@pytest.mark.parametrize("variant", ["pass", "fail", "history"])
def test_screenshot_is_a_png(variant, tmp_path):
    ok, bad, index = _pages(tmp_path)
    page = {"pass": ok, "fail": bad, "history": index}[variant]
    shot = tmp_path / "shot.png"
    proc = _chromium([f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sorting_flattens_and_orders_by_rel_l2(tmp_path):
    out_dir = write_to(make_results(created=T0, failure="rope"), tmp_path / "report")
    body = """
  var t = document.getElementById('modtable'), cb = document.querySelector('[data-failonly="modtable"]');
  cb.checked = false; cb.dispatchEvent(new Event('change'));
  t.tHead.rows[0].cells[5].click();
  var rows = [].filter.call(t.tBodies[0].rows, function(r){ return !r.classList.contains('grp'); });
  out.top = rows[0].cells[0].textContent + ' ' + rows[0].cells[2].textContent;
  out.flat = t.classList.contains('flat');
"""
    out = probe(out_dir / "index.html", body, tmp_path)
    results = make_results(created=T0, failure="rope")
    worst = max(results["modules"], key=lambda r: r["rel_l2"])
    assert out["errors"] == [] and out["flat"], out
    assert out["top"].startswith(worst["name"] + " "), out


# ---------------------------------------------------------------------------------------------------
# Every page at 1280x800: all columns shown; a failing page's first screen holds the cause, the streak, what changed

FITS = """
  out.docW = document.documentElement.scrollWidth;
  out.tables = 0; out.hidden = []; out.clipped = [];
  [].forEach.call(document.querySelectorAll('table'), function(t){
    if (!visible(t)) return;
    out.tables++;
    var wrap = t.parentElement, r = t.getBoundingClientRect();
    if (r.right > 1280 || wrap.scrollWidth > wrap.clientWidth + 1)
      out.hidden.push([t.id || t.className, Math.round(r.width), wrap.clientWidth]);
    if (t.classList.contains('heat')) return;
    [].forEach.call(t.querySelectorAll('th,td'), function(c){
      if (visible(c) && c.scrollWidth > c.clientWidth + 1) out.clipped.push([t.id, c.textContent.slice(0, 50)]);
    });
  });
  var m = document.getElementById('modtable');
  out.tall = m ? [].filter.call(m.tBodies[0].rows, function(r){
    return visible(r) && !r.classList.contains('grp') && r.querySelector('.tag')
      && r.getBoundingClientRect().height > 80; }).length : 0;
  ['first-divergence', 'changed', 'streak'].forEach(function(id){ out[id] = inView(document.getElementById(id)); });
"""


def _realistic(results: dict) -> dict:
    """Rows as real runs have them and the fixture lacks: a mask and a RoPE table row with their detail, a router
    row gated on its own metric, a row not compared with its reason, a bf16-scale cosine."""
    rows = results["modules"]
    rows += [
        {"name": "model.layers.0.self_attn", "megatron_name": "masks[sliding_attention]", "mode": "end_to_end",
         "kind": "mask", "layer": 0, "order": 4, "cosine": 1.0, "rel_l2": 0.0, "max_abs": 0.0, "passed": True,
         "gate": {"metric": "max_abs", "max": 0.0}, "detail": "attention mask (sliding_attention): 0 mismatching "
         "entries"},
        {"name": "model.rotary_emb", "megatron_name": "rotary_tables[sliding_attention]", "mode": "end_to_end",
         "kind": "rope", "order": 1, "cosine": 1.0, "rel_l2": 0.0, "max_abs": 0.0, "passed": True,
         "gate": {"metric": "max_abs", "max": 0.0}, "detail": "cos/sin tables (sliding_attention), default RoPE"},
        {"name": "model.layers.1.router", "megatron_name": "decoder.layers.1.mlp.router", "mode": "isolated",
         "kind": "router", "layer": 1, "order": 40, "cosine": 0.99999971234, "rel_l2": 7.4e-4, "max_abs": 1.2e-3,
         "agree_weight_rel_l2": 7.4e-4, "gate": {"metric": "agree_weight_rel_l2", "max": 0.00931}, "floor": 2.1e-3,
         "ratio": 0.352, "passed": True},
        {"name": "model.layers.0.input_layernorm", "megatron_name": None, "mode": "isolated", "kind": "norm",
         "layer": 0, "order": 0, "cosine": None, "rel_l2": None, "max_abs": None, "gate": None, "passed": True,
         "detail": "HF input_layernorm is fused into linear_qkv (layer_norm_weight): its output is never "
                   "materialised; compared at model.layers.0.self_attn.q_proj"},
    ]
    return results


def _all_pages(tmp_path: Path) -> dict[str, Path]:
    from parity.report.store import write_index, write_session
    from parity.report.systems import write_systems

    root = tmp_path / "reports"
    pages = {"pass": write_run(_realistic(make_results(created=T0)), root) / "index.html"}
    write_run(make_results(created=T0 + timedelta(hours=1), failure="rope"), root)
    failing = _realistic(make_results(created=T0 + timedelta(hours=2), failure="rope"))
    failing["env"]["torch"] = "2.14.0+cpu"
    pages["fail"] = write_run(failing, root) / "index.html"
    big = dict(created=T0 + timedelta(hours=3), case="gemma4-26b-a4b", dtype="bfloat16", device="cuda", n_layers=30)
    write_run(make_results(**big), root)
    pages["fail-26b-bf16"] = write_run(_realistic(make_results(**{**big, "created": T0 + timedelta(hours=4)},
                                                               failure="rope")), root) / "index.html"
    write_session(root, {"created": "2026-05-09T14:00:00Z", "skipped": [
        {"id": "gemma4-26b-a4b-checkpoint@megatron-bridge", "case": "gemma4-26b-a4b-checkpoint",
         "system": "megatron-bridge", "device": "cuda", "dtype": "bfloat16",
         "reason": "needs a checkpoint (case gemma4-26b-a4b-checkpoint): pass --parity-checkpoint DIR or set "
                   "GEMMA4_CHECKPOINT"}]})
    pages["history"] = write_index(root)
    ours, bridge = make_results(), _realistic(make_results(failure="rope"))
    bridge["system"] = {"name": "megatron-bridge", "version": "0.6.2", "substituted": []}
    runs = [("parity", ours, "parity/index.html"), ("megatron-bridge", bridge, "b/index.html")]
    pages["systems"] = write_systems(tmp_path / "both", "gemma4-text-tiny", runs)
    return pages


@pytest.mark.parametrize("variant", ["pass", "fail", "fail-26b-bf16", "history", "systems"])
def test_every_page_fits_1280_without_hiding_a_column(variant, tmp_path):
    out = probe(_all_pages(tmp_path)[variant], FITS, tmp_path)
    assert out["errors"] == [] and out["vw"] == 1280, out
    assert out["docW"] <= 1280 and out["tables"] >= 1, out
    assert out["hidden"] == [], out  # no table wider than its box: every column on screen
    assert out["clipped"] == [], out  # and no cell whose content spills out of its column
    assert out["tall"] == 0, out  # a mask or RoPE row holds at most 4 lines (its reason was squeezed into 180 px)


@pytest.mark.parametrize("variant", ["fail", "fail-26b-bf16"])
def test_failing_page_first_screen_shows_the_cause_the_streak_and_what_changed(variant, tmp_path):
    out = probe(_all_pages(tmp_path)[variant], FITS, tmp_path)
    assert out["first-divergence"] and out["changed"] and out["streak"], out
