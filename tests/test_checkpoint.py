"""The real-checkpoint path on CPU: a random tiny model saved as a sharded HF folder is validated, loaded,
converted and compared through the CLI; bad folders end in one line and exit code 2 before any model is built."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Gemma4ForCausalLM

    from parity.bridge.io import save_folder
    from parity.config import make_text_config, text_config_kwargs
    from parity.engine.randomize import randomize_

    cfg = make_text_config(text_config_kwargs(sliding_window=8))
    model = Gemma4ForCausalLM(cfg)
    randomize_(model, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "gemma4-tiny"
    save_folder(model.state_dict(), cfg, path, max_shard_bytes=200_000)  # several shards + index
    return path


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True, cwd=cwd)


def test_checkpoint_case_runs_from_a_sharded_folder(folder, tmp_path):
    assert (folder / "model.safetensors.index.json").exists()
    out = tmp_path / "r"
    p = _run("run", "--case", "gemma4-checkpoint", "--checkpoint", str(folder), "--device", "cpu",
             "--dtype", "float32", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "results.json").read_text())
    assert r["passed"] and r["summary"]["first_divergence"] is None
    assert r["roundtrip"]["tensors"] == r["roundtrip"]["bit_exact"] > 100
    assert r["summary"]["logits"]["rel_l2"] <= 1e-5


@pytest.mark.parametrize("break_it, words", [
    ("missing_shard", "shard"),
    ("ple", "per-layer embeddings"),
])
def test_bad_checkpoint_is_one_line_exit_2(folder, tmp_path, break_it, words):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    if break_it == "missing_shard":
        next(bad.glob("model-*.safetensors")).unlink()
    else:
        cfg = json.loads((bad / "config.json").read_text())
        cfg["hidden_size_per_layer_input"] = 16
        (bad / "config.json").write_text(json.dumps(cfg))
    p = _run("run", "--case", "gemma4-checkpoint", "--checkpoint", str(bad), "--device", "cpu",
             "--out", str(tmp_path / "r"))
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.strip().splitlines() if not ln.lstrip().startswith(("warnings.warn", "/"))
             and "Warning" not in ln]
    assert len(lines) == 1 and "Traceback" not in p.stderr and words in lines[0].lower(), p.stderr
    assert not (tmp_path / "r" / "results.json").exists()
