"""Provenance: package versions are the packages' own, the git commit carries a dirty flag, and threads,
device and command line are recorded."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from parity import provenance


def test_versions_are_each_packages_own():
    env = provenance.collect("cpu", seed=3, argv=["parity/__main__.py", "run", "--case", "gemma4-text-tiny"])
    for dist, key in (("torch", "torch"), ("transformers", "transformers"), ("megatron-core", "megatron_core")):
        assert env[key] == metadata.version(dist)
    # megatron-core's own __version__ appends `git rev-parse HEAD` of whatever repository its folder sits in
    assert "+" not in env["megatron_core"]
    assert env["threads"] >= 1 and env["seed"] == 3 and env["device_name"]
    assert env["command"].endswith("-m parity run --case gemma4-text-tiny")
    assert isinstance(env["git_dirty"], bool) and len(env["git_commit"]) == 12


def test_source_tree_without_metadata_reports_its_release(monkeypatch):
    fake = type(sys)("megatron.core.package_info")
    fake.__shortversion__ = "0.99.0"
    monkeypatch.setitem(sys.modules, "megatron.core.package_info", fake)

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(provenance.metadata, "version", missing)
    assert provenance.package_version("megatron-core") == "0.99.0 (source)"
    assert provenance.package_version("no-such-dist") is None


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_git_state_marks_local_edits(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    clean = provenance.git_state(repo)
    assert clean["git_dirty"] is False and clean["git_changes"] == 0 and len(clean["git_commit"]) == 12
    (repo / "untracked.txt").write_text("reports are not edits\n")
    assert provenance.git_state(repo)["git_dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    dirty = provenance.git_state(repo)
    assert dirty["git_dirty"] is True and dirty["git_changes"] == 1 and dirty["git_commit"] == clean["git_commit"]
    assert provenance.git_state(tmp_path / "nowhere") == {"git_commit": None, "git_dirty": None, "git_changes": None}


@pytest.mark.parametrize("argv, expected", [
    (["/x/parity/__main__.py", "run"], "-m parity run"),
    (["/usr/bin/pytest", "parity", "-k", "gemma4 and tiny"], "pytest parity -k 'gemma4 and tiny'"),
])
def test_command_line(argv, expected):
    assert provenance.command_line(argv).endswith(expected)


def test_third_party_notices_are_collected_not_printed(capfd):
    import logging
    import warnings

    import transformers  # noqa: F401 - its logger and stderr handler exist before the block, as in a run

    hf = logging.getLogger("transformers")
    before = (hf.handlers[:], hf.propagate)
    notes: list[str] = []
    with pytest.warns(UserWarning, match="ours"):  # the harness's own warnings still reach the user
        with provenance.third_party_notices(notes):
            warnings.warn_explicit("Transformer Engine and Apex are not installed.", UserWarning,
                                   "/venv/lib/python3.11/site-packages/megatron/core/optimizer/__init__.py", 25)
            warnings.warn_explicit("same again", UserWarning, "/x/site-packages/megatron/core/a.py", 1)
            warnings.warn_explicit("same again", UserWarning, "/x/site-packages/megatron/core/a.py", 1)
            logging.getLogger("transformers.modeling_utils").warning("`torch_dtype` is deprecated! Use `dtype`")
            logging.getLogger("megatron.core.models").warning("GPTModel: deprecated argument")
            warnings.warn_explicit("ours", UserWarning, str(provenance.ROOT / "parity" / "cli.py"), 1)
    err = capfd.readouterr().err
    assert "deprecated" not in err and "Transformer Engine" not in err
    assert notes == [  # in the order they came, each once
        "UserWarning: Transformer Engine and Apex are not installed. (megatron/core/optimizer/__init__.py:25)",
        "UserWarning: same again (megatron/core/a.py:1)",
        "transformers.modeling_utils: `torch_dtype` is deprecated! Use `dtype`",
        "megatron.core.models: GPTModel: deprecated argument",
    ]
    assert (hf.handlers, hf.propagate) == before  # transformers' own handler is back
