"""``scripts/gpu_plants.py`` on a tiny train case (CPU): the table written after every plant, and ``--clean-from``
(an earlier table's clean run standing for this one's: at the 26B train shape a clean run costs a plant's time)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = "gemma4-text-tiny-train"


def _run(tmp, *args):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "gpu_plants.py"), "--case", CASE, "--device", "cpu", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_second_call_reuses_the_first_calls_clean_run(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    p = _run(tmp_path, "--plants", "rms detached", "--out", str(first))
    assert p.returncode == 0, p.stderr[-2000:]
    path = first / f"gpu-plants-{CASE}-cpu.json"
    t1 = json.loads(path.read_text())
    assert t1["clean"]["passed"] and t1["n_plants"] == t1["of"] == 1 and t1["caught"] == 1
    assert t1["plants"][0]["first_divergence"] == "model.layers.5.pre_feedforward_layernorm"

    p = _run(tmp_path, "--plants", "loss over padding", "--clean-from", str(path), "--out", str(second))
    assert p.returncode == 0, p.stderr[-2000:]
    t2 = json.loads((second / f"gpu-plants-{CASE}-cpu.json").read_text())
    assert t2["clean"]["from"] == {"table": path.name, "created": t1["created"]}
    assert {k: v for k, v in t2["clean"].items() if k != "from"} == t1["clean"]
    assert t2["caught"] == 1 and t2["plants"][0]["first_divergence"] == "loss"
    assert t2["inputs"] == t1["inputs"] and t2["train"] == t1["train"]

    p = _run(tmp_path, "--seq-len", "12", "--plants", "loss over padding", "--clean-from", str(path),
             "--out", str(tmp_path / "c"))
    assert p.returncode == 2 and "is not this run's clean run (differs in inputs)" in p.stderr
    assert not (tmp_path / "c").exists()  # refused before any model was built or anything written


def test_grad_layers_runs_the_plants_whose_rows_get_gradients(tmp_path):
    """``--grad-layers 5`` (the 26B train shape on an 80 GB card: only layer 5's parameters get gradients, on both
    sides): the plants whose row is a parameter outside layer 5 are not run and say why; every other is caught at its
    row, as without the option (the tiny fp32 train case; in bf16 "aux loss left on" is caught narrowly, at layer 4's
    router, and layer 5's alone misses it: pick the layers for the plants' rows)."""
    p = _run(tmp_path, "--grad-layers", "5", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    t = json.loads((tmp_path / f"gpu-plants-{CASE}-cpu.json").read_text())
    assert t["train"]["grad_layers"] == [5] and t["train"]["steps"] == 0
    not_run = {r["plant"]: r["not_run"] for r in t["plants"] if "not_run" in r}
    assert not_run == {
        "logits gradient in bf16": "its row, model.norm.weight's gradient, is not computed: --grad-layers 5",
        "tied head gradient dropped": "its row, model.embed_tokens.weight's gradient, is not computed: --grad-layers 5 "
                                      "(without --grad-embedding)"}
    ran = {r["plant"]: r["first_divergence"] for r in t["plants"] if "not_run" not in r}
    assert t["caught"] == t["n_plants"] == 6 and t["not_run"] == 2, ran
    assert ran["rms detached"] == "model.layers.5.pre_feedforward_layernorm"  # its own row, not its layer's
    assert ran["K=V tie without gradient"] == "model.layers.5.self_attn.k_proj.weight" and ran["loss over padding"] == "loss"
    # how far each moved its own rows: past their gates, where the clean run sits under them
    for r in (r for r in t["plants"] if "not_run" not in r):
        top = r["nearest"][0]
        assert top["times_gate"] > 1 > top["clean_times_gate"] and r["plant"] and len(r["nearest"]) <= 3, r


def test_the_backward_plants_rows_are_the_models_last_layers():
    """The backward plants sit in the last layer or in every layer, so the backward reaches them first in the last
    layer (the last full one for the K=V tie): 5 in the tiny cases, 29 at 26B-A4B (whose first 26B table named
    tiny's layer 5 for plants it found, rightly, at layer 29)."""
    from parity.cases import load_case
    from tests.plants import BY_NAME, TINY, Shape

    assert Shape.of(load_case(CASE)) == TINY
    big = Shape.of(load_case("gemma4-26b-a4b-train"))
    assert (big.first_full, big.last, big.last_full) == (5, 29, 29)
    assert BY_NAME["rms detached"].expected(big) == "model.layers.29.pre_feedforward_layernorm"
    assert BY_NAME["K=V tie without gradient"].expected_isolated(big) == "model.layers.29.self_attn"
    aux = BY_NAME["aux loss left on"]
    assert aux.expected_isolated(big, bf16=True) == "model.layers.29.router.per_expert_scale"
    assert aux.expected_isolated(TINY) == "model.layers.5.router" and aux.localised_at("model.layers.28.router", big)
    assert BY_NAME["combine probabilities detached"].localised_at("model.layers.29.experts[top_k_weights]", big)


def test_grad_embedding_runs_the_tied_heads_plant(tmp_path):
    """``--grad-embedding`` (``train.grad_embedding``): the word embedding trains too, so the tied head's plant runs
    and is caught at the embedding's gradient, as in a run where everything trains (the 26B shape on an 80 GB card:
    1.4 GiB more a side, where every parameter's gradient is 47 GiB)."""
    p = _run(tmp_path, "--grad-layers", "5", "--grad-embedding", "--plants", "tied head gradient dropped",
             "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    t = json.loads((tmp_path / f"gpu-plants-{CASE}-cpu.json").read_text())
    assert t["train"]["grad_embedding"] is True and t["caught"] == t["n_plants"] == 1 and t["not_run"] == 0
    # the head's share of the tied weight alone (its isolated row) or the embedding's whole gradient
    assert t["plants"][0]["first_divergence"] in ("lm_head.weight", "model.embed_tokens.weight"), t["plants"][0]
    q = _run(tmp_path, "--grad-embedding", "--out", str(tmp_path / "x"))
    assert q.returncode == 2 and "--grad-embedding: only with --grad-layers" in q.stderr


def test_grad_layers_is_for_train_cases(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "gpu_plants.py"), "--case", "gemma4-text-tiny", "--device",
           "cpu", "--grad-layers", "5", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "--grad-layers: only for train cases" in p.stderr
