"""The HF side's checkpoint folders (parity.hf_checkpoint): validated against HF's own model class of the folder's
config (built on the meta device) before anything is instantiated, from config.json, the index and the headers;
a bad folder is one line naming the file or tensor; the text part of a VLM folder is taken by HF's own layout.
Folders are written by HF's own ``save_pretrained`` (good ones) or by safetensors directly (broken ones): no
system under test is involved."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from parity import hf_checkpoint as hc
from parity.config import UnsupportedConfig, make_text_config, text_config_kwargs
from parity.engine.randomize import randomize_
from parity.errors import UserError


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(scope="module")
def text_model():
    from transformers import Gemma4ForCausalLM

    cfg = make_text_config(text_config_kwargs())
    return randomize_(Gemma4ForCausalLM(cfg), seed=11).eval()


@pytest.fixture(scope="module")
def vlm_model():
    from transformers import Gemma4ForConditionalGeneration

    from parity.vlm_config import make_vlm_config

    return randomize_(Gemma4ForConditionalGeneration(make_vlm_config()), seed=12).eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory, text_model):
    path = tmp_path_factory.mktemp("hf") / "text"
    text_model.save_pretrained(path, max_shard_size="200KB")  # HF's own writer: several shards + index
    return path


def write(path, state, config, arch=None):
    """A single-file folder with exactly ``state``'s tensors (no tying, no renaming: what is given is written)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(config)
    if arch:
        config.architectures = [arch]
    config.to_json_file(path / hc.CONFIG_NAME)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, path / hc.SINGLE_NAME)
    return path


def state_of(model, drop=()):
    return {k: v for k, v in model.state_dict().items() if k not in drop}


# ------------------------------------------------------------------------------------------------ good folders


def test_a_good_sharded_folder_passes_and_loads(good, text_model):
    assert (good / hc.INDEX_NAME).exists() and len(list(good.glob("model-*.safetensors"))) > 3
    info = hc.inspect(good)
    assert info.architecture == "Gemma4ForCausalLM" and type(info.config).__name__ == "Gemma4TextConfig"
    assert (info.text_model, info.head) == ("model", "lm_head")
    assert info.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    want = state_of(text_model)
    assert set(info.expected) == set(want) and all(info.expected[k] == tuple(v.shape) for k, v in want.items())
    assert set(info.tensors) == set(want) - {"lm_head.weight"}  # HF does not write a tied head
    assert info.bytes_as(torch.bfloat16) * 2 == info.bytes_as(torch.float32) == info.total_bytes
    state = hc.load(info, dtype=torch.bfloat16)
    assert set(state) == set(info.tensors)
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], want[k].to(torch.bfloat16)) for k in state)
    assert hc.text_keys(info) == {k: k for k in info.tensors}


def test_load_reads_only_the_keys_asked_for_and_renames(good):
    key = "model.norm.weight"
    state = hc.load(good, keys={key: "norm"})
    assert list(state) == ["norm"] and state["norm"].dtype == torch.float32


def test_an_untied_head_must_be_in_the_folder(tmp_path, text_model):
    cfg = copy.deepcopy(text_model.config)
    cfg.tie_word_embeddings = False
    head = torch.zeros(cfg.vocab_size, cfg.hidden_size)
    state = {**state_of(text_model, drop={"lm_head.weight"}), "lm_head.weight": head}
    assert hc.inspect(write(tmp_path / "ok", state, cfg)).tied == {}
    with pytest.raises(hc.CheckpointError) as e:
        hc.inspect(write(tmp_path / "bad", state_of(text_model, drop={"lm_head.weight"}), cfg))
    assert "missing tensor lm_head.weight" in one_line(e)


# ------------------------------------------------------------------------------------------------ bad folders


def test_missing_key(tmp_path, text_model):
    key = "model.layers.3.router.per_expert_scale"
    path = write(tmp_path, state_of(text_model, drop={key}), text_model.config)
    with pytest.raises(hc.CheckpointError) as e:
        hc.inspect(path)
    assert one_line(e) == f"{path}: missing tensor {key} (HF's Gemma4ForCausalLM of this config has it)"


def test_extra_key(tmp_path, text_model):
    key = "model.layers.0.self_attn.v_norm.weight"
    path = write(tmp_path, {**state_of(text_model), key: torch.ones(16)}, text_model.config)
    with pytest.raises(hc.CheckpointError) as e:
        hc.inspect(path)
    assert one_line(e) == (f"{path / hc.SINGLE_NAME}: unexpected tensor {key} "
                           f"(not in HF's Gemma4ForCausalLM of this config)")


def test_wrong_shape(tmp_path, text_model):
    key = "model.layers.2.self_attn.k_proj.weight"
    state = state_of(text_model)
    path = write(tmp_path, {**state, key: state[key][:32]}, text_model.config)
    with pytest.raises(hc.CheckpointError) as e:
        hc.inspect(path)
    assert one_line(e) == (f"{path / hc.SINGLE_NAME}: shape mismatch for {key}: file has [32, 96], "
                           f"HF's Gemma4ForCausalLM of this config expects [64, 96]")


def test_keys_of_another_layout(tmp_path, text_model):
    """A config that names a class whose keys the folder does not use: said once, not one missing key."""
    path = write(tmp_path, state_of(text_model), text_model.config, arch="Gemma4TextModel")
    with pytest.raises(hc.CheckpointError) as e:
        hc.inspect(path)
    assert "none of its" in one_line(e) and "Gemma4TextModel" in one_line(e)


def test_missing_shard_and_missing_weights(good, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(hc.CheckpointError) as e:
        hc.inspect(bad)
    assert one_line(e) == f"{victim}: missing shard referenced by {hc.INDEX_NAME}"
    for f in bad.glob("model*"):
        f.unlink()
    with pytest.raises(hc.CheckpointError, match="no model.safetensors and no model.safetensors.index.json") as e:
        hc.inspect(bad)
    one_line(e)


def test_truncated_file(tmp_path, text_model):
    path = write(tmp_path, state_of(text_model), text_model.config)
    data = (path / hc.SINGLE_NAME).read_bytes()
    (path / hc.SINGLE_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(hc.CheckpointError) as e:
        hc.inspect(path)
    assert one_line(e).startswith(f"{path / hc.SINGLE_NAME}: unreadable safetensors header")


@pytest.mark.parametrize("content,match", [
    (None, "config.json: missing"),
    ("{not json", "does not parse as JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"model_type": "llama"}), "model_type 'llama' is not Gemma 4"),
    (json.dumps({"model_type": "gemma4"}), "without a text_config"),
    ("ARCH", r"architectures \['LlamaForCausalLM'\] not supported"),
    ("VLM_ARCH", "architecture Gemma4ForConditionalGeneration needs model_type 'gemma4', not 'gemma4_text'"),
    ("BAD_VALUE", "not a valid Gemma4TextConfig"),
])
def test_bad_config(good, tmp_path, content, match):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    raw = json.loads((bad / "config.json").read_text())
    if content is None:
        (bad / "config.json").unlink()
    else:
        content = {"ARCH": json.dumps({**raw, "architectures": ["LlamaForCausalLM"]}),
                   "VLM_ARCH": json.dumps({**raw, "architectures": ["Gemma4ForConditionalGeneration"]}),
                   "BAD_VALUE": json.dumps({**raw, "layer_types": ["no_such_attention"] * raw["num_hidden_layers"]}),
                   }.get(content, content)
        (bad / "config.json").write_text(content)
    with pytest.raises(hc.CheckpointError, match=match) as e:
        hc.inspect(bad)
    assert one_line(e).startswith(str(bad / "config.json"))


def test_unsupported_feature_is_refused_before_the_keys(good, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    raw = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**raw, "attention_bias": True}))
    with pytest.raises(UnsupportedConfig) as e:
        hc.inspect(bad)
    assert "attention_bias=True" in one_line(e)


def test_a_bad_folder_is_a_user_error_of_one_line():
    from parity.cli import user_error_message

    e = hc.CheckpointError("/ckpt: missing tensor model.norm.weight")
    assert isinstance(e, UserError) and isinstance(e, ValueError)
    assert user_error_message(e) == "/ckpt: missing tensor model.norm.weight"


# ------------------------------------------------------------------------------------------------ VLM folders


def test_text_part_of_a_vlm_folder(tmp_path, vlm_model):
    from transformers import Gemma4ForCausalLM

    vlm_model.save_pretrained(tmp_path, max_shard_size="300KB")
    info = hc.inspect(tmp_path)
    assert info.architecture == "Gemma4ForConditionalGeneration"
    assert (info.text_model, info.head) == ("model.language_model", "lm_head")
    keys = hc.text_keys(info)
    src = state_of(vlm_model)
    assert set(keys) == {k for k in info.tensors if k.startswith("model.language_model.")}  # tied head not written
    assert keys["model.language_model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert info.bytes_as(None, keys) < info.total_bytes
    state = hc.load(info, keys=keys)
    lm = Gemma4ForCausalLM(vlm_model.config.text_config)
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied: the embedding is the head
    assert all(torch.equal(state[new], src[old]) for old, new in keys.items())


def test_text_part_of_a_vlm_folder_with_its_own_head(tmp_path, vlm_model):
    cfg = copy.deepcopy(vlm_model.config)
    cfg.text_config.tie_word_embeddings = cfg.tie_word_embeddings = False
    head = torch.randn(cfg.text_config.vocab_size, cfg.text_config.hidden_size)
    info = hc.inspect(write(tmp_path, {**state_of(vlm_model, drop={"lm_head.weight"}), "lm_head.weight": head}, cfg))
    keys = hc.text_keys(info)
    assert keys["lm_head.weight"] == "lm_head.weight"
    assert torch.equal(hc.load(info, keys=keys)["lm_head.weight"], head)


def test_text_part_of_a_bare_text_model_folder(tmp_path, text_model):
    """``Gemma4TextModel`` keys have no prefix; HF's layout places them under ``model.`` of a CausalLM."""
    state = {k[len("model."):]: v for k, v in state_of(text_model).items() if k.startswith("model.")}
    info = hc.inspect(write(tmp_path, state, text_model.config, arch="Gemma4TextModel"))
    assert (info.text_model, info.head) == ("", None)
    keys = hc.text_keys(info)
    assert keys["norm.weight"] == "model.norm.weight" and len(keys) == len(state)


# ------------------------------------------------------------------------------------------------ the engine


def test_the_engine_checks_the_memory_before_reading_tensors(good, monkeypatch):
    from parity.engine import kinds

    needs, loads = [], []
    monkeypatch.setattr(kinds, "_check_memory", lambda need, device, what: needs.append(need) or
                        (_ for _ in ()).throw(UserError(f"out of memory: {what}")))
    monkeypatch.setattr(hc, "load", lambda *a, **kw: loads.append(a))
    case = SimpleNamespace(name="c")
    with pytest.raises(UserError, match="out of memory"):
        kinds.KINDS["text"].build(case, torch.float32, "cpu", str(good), 0)
    assert needs == [hc.inspect(good).total_bytes] and loads == []


def test_the_vlm_kind_refuses_a_text_folder_before_loading(good, monkeypatch):
    from parity.engine import kinds

    monkeypatch.setattr(hc, "load", lambda *a, **kw: pytest.fail("loaded"))
    with pytest.raises(UserError) as e:
        kinds.KINDS["vlm"].build(SimpleNamespace(name="v"), torch.float32, "cpu", str(good), 0)
    assert "a Gemma4ForCausalLM checkpoint, but case v needs a Gemma4ForConditionalGeneration" in one_line(e)


def test_the_text_kind_builds_from_a_vlm_folder(tmp_path, vlm_model):
    from parity.engine import kinds

    vlm_model.save_pretrained(tmp_path)
    model, config = kinds.KINDS["text"].build(SimpleNamespace(name="t"), torch.float32, "cpu", str(tmp_path), 0)
    assert type(model).__name__ == "Gemma4ForCausalLM" and type(config).__name__ == "Gemma4TextConfig"
    src = vlm_model.model.language_model.state_dict()
    got = model.model.state_dict()
    assert set(got) == set(src) and all(torch.equal(got[k], src[k]) for k in src)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
