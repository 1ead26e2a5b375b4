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
