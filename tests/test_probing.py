"""Probing inputs where real bugs hide (issue 22, items 2-3): the mode ``probing`` replays modules on moved inputs
(norms at input RMS 1e-3 and 1e4, positions at the end of the context, lengths at the sliding window's edges, a
row all padding, one token, routing near-ties), both sides fed the same, and a seeded search shrinks a failure to
the smallest input.

Sensitivity targets, each a Megatron-side plant of ``tests/plants.py``:
- an RMSNorm eps of 1e-5 instead of 1e-6 (Megatron-Bridge finding 2's class) fails by at least 10x its gate in
  tiny fp32 and bf16, where the run's own inputs leave it under the gate;
- position ids cast to bf16 before the RoPE angles fail at long positions only (exact up to 256), and the search
  finds where that starts; angles rounded to bf16 fail everywhere;
- a sliding window off by one fails at the window's edge (W+1) with a sequence shorter than the window, where the
  run's own inputs cannot show it.
Clean runs of both systems keep passing with the probing rows on five seeds (Megatron-Bridge: only its findings).
"""
from __future__ import annotations

import pytest

from parity.cases import load_case
from parity.engine.launch import execute
from tests.plants import BY_NAME, CASES, bridge_probing_finding

TINY = {"float32": "gemma4-text-tiny", "bfloat16": "gemma4-text-tiny-bf16"}
W = 8  # the tiny cases' sliding window


def _run(case, monkeypatch=None, plant: str | None = None, seed: int | None = None, system: str = "parity") -> dict:
    case = load_case(case) if isinstance(case, str) else case
    if plant is not None:
        BY_NAME[plant].plant(monkeypatch, None)
    return execute(case, device="cpu", seed=seed, system=system)


def _rows(r: dict, mode: str | None = "probing", **match) -> list[dict]:
    return [m for m in r["modules"] if (mode is None or m["mode"] == mode)
            and all(str(m.get(k) or "").startswith(v) if isinstance(v, str) else m.get(k) == v
                    for k, v in match.items())]


def _times_gate(m: dict) -> float:
    """How far a row is past its gate: its gated value over the gate, and in bf16 its truth over the truth gate."""
    out = m[m["gate"]["metric"]] / m["gate"]["max"]
    if m.get("truth_gate"):
        out = max(out, m["truth_rel_l2"] / m["truth_gate"]["max"])
    return out


def _explain(r: dict) -> str:
    bad = sorted((m for m in r["modules"] if not m["passed"]), key=lambda m: (m["order"], m["mode"]))
    return f"passed={r['passed']} first={r['summary']['first_divergence']!r}; " + "; ".join(
        f"{m['name']} [{m['mode']} {m.get('probe')}] {m.get('rel_l2')} why={m.get('why')}" for m in bad[:6])


# ---------------------------------------------------------------------------------------------------
# Sensitivity targets

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_norm_eps_1e5_fails_by_10x_its_gate(monkeypatch, dtype):
    r = _run(CASES[dtype], monkeypatch, "post_attention_norm_eps")
    assert r["passed"] is False and r["summary"]["first_divergence"] == "model.layers.0.post_attention_layernorm", \
        _explain(r)
    small = _rows(r, name="model.layers.", probe="magnitude: input RMS 0.001")
    small = [m for m in small if m["name"].endswith(".post_attention_layernorm")]
    assert len(small) == 6 and all(not m["passed"] and _times_gate(m) >= 10 for m in small), small
    # every other norm passes the same probe: the eps is the planted one's alone
    others = [m for m in _rows(r, probe="magnitude") if not m["name"].endswith(".post_attention_layernorm")]
    assert others and all(m["passed"] for m in others)
    # the run's own inputs leave it under the gate: the probe is what sees it
    iso = _rows(r, mode="isolated", name="model.layers.0.post_attention_layernorm")
    assert iso and all(m["passed"] for m in iso), iso
    found = r["probing"]["families"]["magnitude"]["search"]["found"]
    assert found["row"].endswith(".post_attention_layernorm") and found["rms"] <= 0.1, found  # the mildest failing


def test_rope_positions_in_bf16_fail_at_long_positions_only(monkeypatch):
    r = _run(TINY["float32"], monkeypatch, "rope_positions_bf16")
    assert r["passed"] is False and r["summary"]["first_divergence"] == "model.rotary_emb", _explain(r)
    assert all(m["passed"] for m in r["modules"] if m["mode"] != "probing")  # positions 0..39: exact in bf16
    far = [m for m in _rows(r, probe="positions: +131,032") if m["kind"] != "mask"]  # masks: no positions in them
    assert far and all(not m["passed"] and _times_gate(m) >= 10 for m in far), far
    assert {m["kind"] for m in far} == {"rope", "attention"}
    assert all(m["passed"] for m in _rows(r) if not m["probe"].startswith("positions"))
    found = r["probing"]["families"]["positions"]["search"]["found"]
    assert 256 < found["offset"] + 39 <= 512, found  # the search: from where bf16 stops holding integers


def test_rope_angles_in_bf16_fail_everywhere(monkeypatch):
    r = _run(TINY["float32"], monkeypatch, "rope_angles_bf16")
    assert r["passed"] is False and r["summary"]["first_divergence"] == "model.rotary_emb", _explain(r)
    e2e = _rows(r, mode="end_to_end", kind="rope")
    assert e2e and all(not m["passed"] for m in e2e)
    far = _rows(r, probe="positions: +131,032", kind="rope")
    assert far and all(_times_gate(m) >= 1e4 for m in far), far  # rel-L2 of order 1 at the end of the context


def test_window_off_by_one_fails_at_the_edge_with_a_short_sequence(monkeypatch):
    """Six tokens, window 8: the run's own mask is plain causal on both sides and every row of the run passes;
    the probe at length W+1 is the first to reach past the window."""
    case = load_case(TINY["float32"]).replace(inputs={"batch": 2, "seq_len": 6, "pad_tail": 0})
    r = _run(case, monkeypatch, "sliding_window_off_by_one")
    assert all(m["passed"] for m in r["modules"] if m["mode"] != "probing"), _explain(r)
    assert r["passed"] is False and r["summary"]["first_divergence"] == "model.layers.0.self_attn", _explain(r)
    d = r["summary"]["first_divergence_detail"]
    assert d["megatron_name"] == "masks[sliding_attention]" and d["mode"] == "probing", d
    masks = {m["probe"]: m for m in _rows(r, kind="mask", megatron_name="masks[sliding_attention]")}
    assert masks[f"window: length {W - 1} (W-1)"]["passed"] and masks[f"window: length {W} (W)"]["passed"]
    assert not masks[f"window: length {W + 1} (W+1)"]["passed"] and not masks[f"window: length {2 * W + 1} (2W+1)"][
        "passed"]
    assert all(m["passed"] for m in _rows(r, kind="mask", megatron_name="masks[full_attention]"))
    assert r["probing"]["families"]["window"]["search"]["found"]["length"] == W + 1  # shrunk to the edge


# ---------------------------------------------------------------------------------------------------
# Clean runs, determinism, cost

@pytest.mark.parametrize("case", [TINY["float32"], TINY["bfloat16"], "gemma4-vlm-tiny"])
def test_clean_runs_pass_with_the_probing_rows_on_five_seeds(case):
    for seed in range(5):
        r = _run(case, seed=seed)
        assert r["passed"] is True, (seed, _explain(r))
        probing = _rows(r)
        assert len(probing) > 100 and all(m["passed"] for m in probing)
        for family in r["probing"]["families"].values():
            assert family.get("skipped") or not (family.get("search") or {}).get("found"), family


def test_a_probing_run_is_reproducible():
    """The same seed draws the same probes and the same search examples: the rows are identical."""
    a, b = (_run(TINY["float32"], system="megatron-bridge") if _bridge() else _run(TINY["float32"]) for _ in range(2))
    keep = ("name", "mode", "probe", "rel_l2", "max_abs", "passed", "example")
    assert [{k: m.get(k) for k in keep} for m in _rows(a)] == [{k: m.get(k) for k in keep} for m in _rows(b)]
    assert [f.get("search") and {k: v for k, v in f["search"].items() if k != "seconds"}
            for f in a["probing"]["families"].values()] == \
           [f.get("search") and {k: v for k, v in f["search"].items() if k != "seconds"}
            for f in b["probing"]["families"].values()]


def test_the_cost_of_probing_is_recorded():
    r = _run(TINY["float32"])
    pr = r["probing"]
    assert pr["seconds"] == r["phases"]["probing"] and 0 < pr["share_of_run"] < 1
    assert set(pr["families"]) == {"magnitude", "near-tie", "positions", "window", "padding", "single token"}
    assert {"name": "probing", "label": "probing", "ran": True} in r["modes"]


def test_probes_on_the_first_layer_of_each_type_still_catch_the_eps_plant(monkeypatch):
    """``run.probe_layers = "first_of_type"`` (the full-size cases, for the probes' cost): every probing row sits in
    layer 0 (sliding) or 2 (the first full layer) or outside the layers, the section says so, a clean run passes, and
    the eps plant still fails at layer 0's post-attention norm by 10x its gate."""
    case = load_case(TINY["float32"]).replace(run={"probe_layers": "first_of_type"})
    clean = _run(case)
    every = _run(TINY["float32"])
    rows = _rows(clean)
    assert clean["passed"] is True and {m["layer"] for m in rows} == {0, 2, None}
    assert clean["probing"]["layers"]["probed"] == [0, 2] and clean["probing"]["layers"]["of"] == 6
    assert 0 < len(rows) < len(_rows(every)) / 2 and "layers" not in every["probing"]
    r = _run(case, monkeypatch, "post_attention_norm_eps")
    assert r["passed"] is False and r["summary"]["first_divergence"] == "model.layers.0.post_attention_layernorm"
    small = [m for m in _rows(r, probe="magnitude: input RMS 0.001") if m["name"].endswith(".post_attention_layernorm")]
    assert len(small) == 2 and all(_times_gate(m) >= 10 for m in small), small


def test_without_hypothesis_the_fixed_points_still_run(monkeypatch):
    """A machine without hypothesis (a bare GPU image) runs the fixed probes; each search says why it did not run."""
    import sys

    for name in [m for m in sys.modules if m == "hypothesis" or m.startswith("hypothesis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis -> ImportError
    r = _run(TINY["float32"])
    assert r["passed"] is True and len(_rows(r)) > 100
    searches = [f["search"] for f in r["probing"]["families"].values() if f.get("search")]
    assert searches and all(s == {"skipped": "hypothesis is not installed here: the fixed points only"}
                            for s in searches), searches
    from parity.report.html import render_run

    assert "hypothesis is not installed here" in render_run(r)


def _bridge() -> bool:
    from parity import mbridge

    return mbridge.available()[0]


@pytest.mark.skipif(not _bridge(), reason="NVIDIA Megatron-Bridge is not installed")
def test_megatron_bridge_probing_shows_only_its_findings_on_five_seeds():
    """Megatron-Bridge 0.6.2 on the tiny text case: its run's own rows pass, its probing rows fail only where its
    findings are -- the post-attention norm's eps 1e-5 (finding 2) at small input RMS, and its RoPE built from
    the sequence index rather than the position ids (finding 12) at long positions."""
    for seed in range(5):
        r = _run(TINY["float32"], seed=seed, system="megatron-bridge")
        assert all(m["passed"] for m in r["modules"] if m["mode"] != "probing"), (seed, _explain(r))
        bad = [m for m in _rows(r) if not m["passed"]]
        assert bad and all(bridge_probing_finding(m) in (2, 10) for m in bad), (seed, _explain(r))
        eps = [m for m in bad if m["probe"] == "magnitude: input RMS 0.001"]
        assert len(eps) == 6 and min(_times_gate(m) for m in eps) > 1e4, eps


@pytest.mark.parametrize("system", ["parity", "megatron-bridge"])
def test_module_probes_run_on_the_first_positions_of_every_row(monkeypatch, system):
    """At 26B the module probes (norms, routers: token by token) take 512 of 4,096 positions. Here 37 of the tiny
    case's 40, so that the cut reaches into its second row's padded tail (5 positions) and both layouts ([b, s, ...] and the flat
    [b*s, ...] of routers) are cut: a clean run keeps passing (Megatron-Bridge: only its findings), the eps plant
    still fails by 10x, and every module probe measured 37 positions per row."""
    if system == "megatron-bridge" and not _bridge():
        pytest.skip("NVIDIA Megatron-Bridge is not installed")
    from parity.engine.modes import probing

    monkeypatch.setattr(probing, "TOKENS", 37)
    shapes = []
    with_main = probing._with_main
    monkeypatch.setattr(probing, "_with_main", lambda call, x, device: shapes.append(tuple(x.shape))
                        or with_main(call, x, device))
    case = load_case(TINY["float32"])
    valid = _run(case, system=system)
    assert len(shapes) >= len(_rows(valid, probe="magnitude") + _rows(valid, probe="near-tie")) > 100  # + searches
    assert {s[:2] for s in shapes if len(s) > 2} == {(2, 37)} and {s[0] for s in shapes if len(s) == 2} == {2 * 37}
    if system == "parity":
        assert valid["passed"] is True, _explain(valid)
        r = _run(case, monkeypatch, "post_attention_norm_eps")
        small = [m for m in _rows(r, probe="magnitude: input RMS 0.001") if m["name"].endswith(".post_attention_layernorm")]
        assert len(small) == 6 and all(not m["passed"] and _times_gate(m) >= 10 for m in small), small
    else:
        bad = [m for m in _rows(valid) if not m["passed"]]
        assert all(m["passed"] for m in valid["modules"] if m["mode"] != "probing"), _explain(valid)
        assert bad and all(bridge_probing_finding(m) in (2, 10) for m in bad), _explain(valid)


def test_an_image_span_longer_than_the_window_is_probed(monkeypatch):
    """A VLM's sliding mask that lets a whole image span through past the window is invisible wherever every image is
    shorter than the window (the 26B-A4B VLM: 256 soft tokens under 1,024): here the tiny VLM with a window of 128
    over its 63-token images, every row of the run passes; the image-span probes at W+1 and 2W+1 soft tokens fail at
    the sliding mask, and the search shrinks to W+1."""
    from tests.plants import image_block_past_the_window

    case = load_case("gemma4-vlm-tiny").replace(model={"overrides": {"text": {"sliding_window": 128}}})
    image_block_past_the_window(monkeypatch)
    r = execute(case, device="cpu")
    assert all(m["passed"] for m in r["modules"] if m["mode"] != "probing"), _explain(r)
    d = r["summary"]["first_divergence_detail"]
    assert r["passed"] is False and d["mode"] == "probing" and d["megatron_name"] == "masks[sliding_attention]", d
    spans = {m["probe"]: m for m in _rows(r, kind="mask", megatron_name="masks[sliding_attention]")
             if m["probe"].startswith("image span")}
    assert spans["image span: 127 soft tokens (W-1)"]["passed"] and spans["image span: 128 soft tokens (W)"]["passed"]
    assert not spans["image span: 129 soft tokens (W+1)"]["passed"]
    assert not spans["image span: 257 soft tokens (2W+1)"]["passed"]
    assert all(m["passed"] for m in _rows(r, kind="mask", megatron_name="masks[full_attention]"))
    assert r["probing"]["families"]["image spans"]["search"]["found"]["span"] == 129


def test_megatron_bridge_vlm_image_spans_show_finding_1():
    """Megatron-Bridge's MoE VLM at the image-span probes: its sliding mask is causal inside every image span (finding
    1: its TE core attention ignores the image-bidirectional mask), so each span of n soft tokens misses exactly the
    n(n-1)/2 future keys HF's sliding layers let through, from a span of 2 up (the search shrinks there); its full
    mask agrees, as HF's full layers are causal."""
    from parity import mbridge

    if not mbridge.available()[0]:
        pytest.skip(f"Megatron-Bridge not importable: {mbridge.available()[1]}")
    r = execute(load_case("gemma4-vlm-tiny"), device="cpu", system="megatron-bridge")
    fam = r["probing"]["families"]["image spans"]
    spans = [m for m in _rows(r, kind="mask") if m["probe"].startswith("image span")]
    assert fam["rows"] == len(spans) == 10 and fam["search"]["found"]["span"] == 2
    for m in spans:
        n = int(m["probe"].split(": ")[1].split(" ")[0])
        if m["megatron_name"] == "masks[full_attention]":
            assert m["passed"], m
        else:
            assert not m["passed"] and m["detail"].endswith(f": {n * (n - 1) // 2} mismatching entries"), m


def test_input_probes_run_for_models_with_per_layer_embeddings(monkeypatch):
    """E2B-shaped (per-layer embeddings, the last 5 of 10 layers KV-shared): the per-layer inputs join a layer after
    its attention, where a probe's layer run stops, so the input probes run; the KV-shared layers are left out (they
    reuse an earlier layer's K/V: their sources are probed), said once in the section. Positions cast to bf16 pass
    the run's own 40 positions and fail at the end of the context, at the RoPE table first."""
    r = _run("gemma4-e2b-tiny", monkeypatch, "rope_positions_bf16")
    assert r["passed"] is False and r["summary"]["first_divergence"] == "model.rotary_emb", _explain(r)
    assert all(m["passed"] for m in r["modules"] if m["mode"] != "probing")
    families = r["probing"]["families"]
    assert all(families[f]["rows"] > 0 and not families[f].get("skipped")
               for f in ("positions", "window", "padding", "single token"))
    assert r["probing"]["kv_shared_layers"]["layers"] == [5, 6, 7, 8, 9]
    attention = {m["layer"] for m in _rows(r) if m["kind"] == "attention"}
    assert attention == {0, 1, 2, 3, 4}
    far = [m for m in _rows(r) if m["probe"].startswith("positions: +") and "found" not in m["probe"]
           and m["kind"] != "mask"]
    assert far and all(not m["passed"] for m in far) and {m["kind"] for m in far} == {"rope", "attention"}
