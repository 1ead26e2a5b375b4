"""Regression flags people can trust: identical runs flag nothing, CPU thread noise is drift, and a planted
error names exactly the rows it broke (rows keyed by HF name, Megatron name, kind and mode)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.report.history import MATERIAL, compare, regressions
from parity.report.store import write_run
from parity.report.summary import row_key


def _row(name, megatron, kind, mode, value, gate=1e-5, metric="rel_l2", passed=None):
    passed = value <= gate if passed is None else passed
    return {"name": name, "megatron_name": megatron, "kind": kind, "mode": mode, metric: value,
            "gate": {"metric": metric, "max": gate}, "passed": passed}


def _results(rows, passed=True, created="2026-05-09T09:00:00Z"):
    return {"case": "c", "device": "cpu", "dtype": "float32", "passed": passed, "created": created, "modules": rows}


def test_mask_and_attention_rows_of_one_module_are_not_confused():
    """The measured false alarm: the mask row (0) and the attention row (3e-7) of model.layers.2.self_attn
    shared the key (HF name, mode), so two identical runs showed "1 regression"."""
    rows = [_row("model.layers.2.self_attn", "decoder.layers.2.self_attention", "attention", "end_to_end", 3.03e-7),
            _row("model.layers.2.self_attn", "masks[full_attention]", "mask", "end_to_end", 0.0, gate=0.0,
                 metric="max_abs")]
    a, b = _results(rows), _results(copy.deepcopy(rows), created="2026-05-09T10:00:00Z")
    assert compare(b, a) == []
    assert len({row_key(r) for r in rows}) == 2


def test_thread_count_noise_is_drift_not_regression():
    """fp32 CPU values move from 0 (1 thread) to ~2e-7 (2 threads) against a 1e-5 gate: drift only."""
    names = [f"model.layers.{i}.{m}" for i in range(6) for m in ("self_attn", "mlp", "experts")]
    zero = _results([_row(n, n, "x", "end_to_end", 0.0) for n in names])
    noisy = _results([_row(n, n, "x", "end_to_end", 2.3e-7) for n in names], created="2026-05-09T10:00:00Z")
    flags = compare(noisy, zero)
    assert regressions(flags) == []
    assert len(flags) == len(names) and {f["severity"] for f in flags} == {"drift"}
    assert all("from 0" in f["message"] for f in flags)
    assert regressions(compare(zero, noisy)) == []


def test_planted_error_names_exactly_the_rows_it_broke():
    base = [_row("model.layers.1.mlp", "decoder.layers.1.mlp", "mlp", m, 1e-7) for m in ("isolated", "end_to_end")]
    base += [_row("model.layers.2.self_attn", "decoder.layers.2.self_attention", "attention", m, 2e-7)
             for m in ("isolated", "end_to_end")]
    base += [_row("model.layers.2.self_attn", "masks[full_attention]", "mask", "end_to_end", 0.0, gate=0.0,
                  metric="max_abs")]
    broken = copy.deepcopy(base)
    broken[4]["max_abs"], broken[4]["passed"] = 1.0, False  # the mask, not the attention output
    broken[1]["rel_l2"] = 3e-6  # end-to-end mlp grew 30x to 30 % of its gate, still passing
    flags = compare(_results(broken, passed=False, created="2026-05-09T10:00:00Z"), _results(base))
    assert flags[0]["kind"] == "verdict"
    named = {(f["name"], f["megatron_name"], f["row_kind"], f["mode"], f["kind"]) for f in regressions(flags)[1:]}
    assert named == {("model.layers.2.self_attn", "masks[full_attention]", "mask", "end_to_end", "gate"),
                     ("model.layers.1.mlp", "decoder.layers.1.mlp", "mlp", "end_to_end", "growth")}


def test_crossing_the_gate_is_a_regression_without_2x_growth():
    a = _results([_row("m", "m", "k", "isolated", 9e-6)])
    b = _results([_row("m", "m", "k", "isolated", 1.1e-5)], passed=False, created="2026-05-09T10:00:00Z")
    assert [(f["kind"], f["severity"]) for f in compare(b, a)] == [("verdict", "regression"), ("gate", "regression")]


_values = st.one_of(st.just(0.0), st.floats(1e-12, 1.0, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_values, _values), min_size=1, max_size=12), st.floats(1e-6, 1.0))
def test_law_below_the_material_fraction_nothing_is_a_regression(pairs, gate):
    """Law: when every row stays within its gate and below MATERIAL of it now, no flag is a regression,
    however much the rows grew; and a run compared with itself flags nothing."""
    prev = _results([_row(f"r{i}", "m", "k", "isolated", a * gate, gate=gate) for i, (a, _) in enumerate(pairs)])
    cur = _results([_row(f"r{i}", "m", "k", "isolated", b * gate * MATERIAL * 0.999, gate=gate, passed=True)
                    for i, (a, b) in enumerate(pairs)], created="2026-05-09T10:00:00Z")
    assert regressions(compare(cur, prev)) == []
    assert compare(prev, copy.deepcopy(prev)) == []


@settings(max_examples=200, deadline=None)
@given(_values, st.floats(2.0, 1e6), st.floats(1e-6, 1.0))
def test_law_material_growth_is_always_flagged(before, factor, gate):
    """Law: a passing row whose value grows >= 2x to at least MATERIAL of its gate is a regression."""
    prev_v = before * gate * MATERIAL / factor
    cur_v = max(prev_v * factor, MATERIAL * gate)
    if cur_v < 2 * max(prev_v, 1e-12):
        return
    prev = _results([_row("r", "m", "k", "isolated", prev_v, gate=gate)])
    cur = _results([_row("r", "m", "k", "isolated", cur_v, gate=gate)], created="2026-05-09T10:00:00Z")
    assert [f["kind"] for f in regressions(compare(cur, prev))] == [("gate" if cur_v > gate else "growth")]


# ------------------------------------------------------------------------------------------- real engine


@pytest.fixture(scope="module")
def two_real_runs():
    """The tiny text case run twice by the real engine, with 2 and then 1 torch threads."""
    from parity.cases import load_case
    from parity.engine.pipeline import run  # not launch.execute, which pins CPU runs to one thread

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = run(load_case("gemma4-text-tiny"), device="cpu")
        torch.set_num_threads(1)
        b = run(load_case("gemma4-text-tiny"), device="cpu")
    finally:
        torch.set_num_threads(before)
    return a, b


def test_two_real_runs_in_a_row_have_zero_regressions(two_real_runs, tmp_path):
    a, b = two_real_runs
    assert a["passed"] and b["passed"]
    assert (a["env"]["threads"], b["env"]["threads"]) == (2, 1)
    write_run(a, tmp_path)
    second = write_run(b, tmp_path)
    record = json.loads((second / "results.json").read_text())["regressions"]
    assert record["previous"] is not None and record["count"] == 0, record["flags"][:5]
    assert all(f["severity"] == "drift" for f in record["flags"])
    html = (second / "index.html").read_text()
    assert "0 regressions" in html or "None: no verdict flip" in html


def test_real_run_with_a_planted_mask_error_names_the_mask_row(two_real_runs):
    a, b = two_real_runs
    broken = copy.deepcopy(b)
    mask = next(r for r in broken["modules"] if r.get("kind") == "mask" and r["name"] == "model.layers.2.self_attn")
    attn = next(r for r in broken["modules"] if r.get("kind") == "attention" and r["name"] == mask["name"]
                and r["mode"] == mask["mode"])
    metric = mask["gate"]["metric"]
    mask[metric], mask["passed"], broken["passed"] = 1.0, False, False
    flags = regressions(compare(broken, a))
    assert [f["kind"] for f in flags] == ["verdict", "gate"]
    assert (flags[1]["name"], flags[1]["megatron_name"], flags[1]["row_kind"], flags[1]["mode"]) == (
        mask["name"], mask["megatron_name"], "mask", mask["mode"])
    assert flags[1]["megatron_name"] != attn["megatron_name"]
    assert math.isclose(flags[1]["current"], 1.0)


def test_rows_that_now_fail_are_listed_in_forward_order():
    names = ["model.layers.2.self_attn", "model.layers.3.mlp", "lm_head"]
    base = [dict(_row(n, n, "k", "end_to_end", 1e-7), order=i) for i, n in enumerate(names)]
    broken = copy.deepcopy(base)
    for r, v in zip(broken, (0.3, 0.2, 5.0)):  # lm_head grew most, but layer 2 broke first
        r["rel_l2"], r["passed"] = v, False
    flags = regressions(compare(_results(broken, passed=False, created="2026-05-09T10:00:00Z"), _results(base)))
    assert [f["name"] for f in flags[1:]] == names
