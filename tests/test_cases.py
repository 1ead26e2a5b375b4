"""Case files: every shipped case validates; a bad file gives one CaseError line naming the file and the field."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import cases as C
from parity.errors import CaseError, UserError

REQUIRED = ("gemma4-text-tiny", "gemma4-vlm-tiny", "gemma4-26b-a4b")

VALID = """\
name = "x-tiny"
description = "a test case"
kind = "text"
devices = ["cpu", "cuda"]
dtype = "float32"
seed = 0
markers = ["cpu"]

[model]
builder = "tiny_text"
overrides = { sliding_window = 8 }

[inputs]
batch = 2
seq_len = 40
pad_tail = 5

[parallel]
tp = 1
ep = 1

[run]
sequential = false
offload = false

[gates]
exact = ["model.embed_tokens"]

[gates.float32]
rel_l2 = 1e-5
logits_rel_l2 = 1e-5
kl_max = 1e-6

[gates.bfloat16]
floor_multiplier = 4.0
floor_abs = 1e-3
logits_kl_max = 0.05
"""

VLM = VALID.replace('kind = "text"', 'kind = "vlm"').replace('builder = "tiny_text"', 'builder = "tiny_vlm"').replace(
    "overrides = { sliding_window = 8 }", "").replace("seq_len = 40\npad_tail = 5",
                                                      "images = [[[24, 32], [16, 16]], [[32, 24]]]")


def write(tmp_path: Path, text: str, name: str = "x-tiny") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------
# The shipped cases

@pytest.mark.parametrize("name", C.case_names())
def test_every_case_file_loads(name):
    case = C.load_case(name)
    assert case.name == name and case.description
    assert case.dtype in case.gates.keys() or hasattr(case.gates, case.dtype)
    if case.world_size > 1:
        assert case.devices == ("cuda",) and "multigpu" in case.markers


def test_required_cases_exist():
    names = C.case_names()
    for name in REQUIRED + ("gemma4-text-tiny-bf16", "gemma4-text-dense-tiny", "gemma4-vlm-tiny-bf16",
                            "gemma4-26b-a4b-tp2", "gemma4-26b-a4b-ep2", "gemma4-checkpoint"):
        assert name in names


def test_shipped_case_shapes():
    tiny = C.load_case("gemma4-text-tiny")
    assert (tiny.kind, tiny.dtype, tiny.devices) == ("text", "float32", ("cpu", "cuda"))
    assert (tiny.inputs.batch, tiny.inputs.seq_len, tiny.inputs.pad_tail) == (2, 40, 5)
    assert tiny.inputs.seq_len > tiny.model.overrides["sliding_window"]
    assert C.load_case("gemma4-text-dense-tiny").dense and not tiny.dense
    big = C.load_case("gemma4-26b-a4b")
    assert big.gpu_only and big.dtype == "bfloat16" and big.run.sequential and big.run.offload
    assert big.model.builder == "full_text" and {"gpu", "slow"} <= set(big.markers)
    assert C.load_case("gemma4-26b-a4b-tp2").parallel.tp == 2
    assert C.load_case("gemma4-26b-a4b-ep2").parallel.ep == 2
    vlm = C.load_case("gemma4-vlm-tiny")
    assert vlm.kind == "vlm" and len(vlm.inputs.images) == vlm.inputs.batch
    vlm26 = C.load_case("gemma4-26b-a4b-vlm")
    assert vlm26.model.builder == "full_vlm" and vlm26.gpu_only and vlm26.run.sequential and vlm26.run.offload
    assert vlm26.inputs.max_soft_tokens == 280 and vlm.inputs.max_soft_tokens == 70  # the default
    assert "max_soft_tokens" not in tiny.to_dict()["inputs"] and tiny.replace(dtype="bfloat16").dtype == "bfloat16"
    ckpt = C.load_case("gemma4-checkpoint")
    assert ckpt.needs_checkpoint and ckpt.model.checkpoint_env == "GEMMA4_CHECKPOINT"


def test_engine_reads_a_case():
    """The engine reads the typed case: the text kind's raw inputs follow its numbers, its gates reach the results."""
    from types import SimpleNamespace

    kinds = pytest.importorskip("parity.engine.kinds")
    case = C.load_case("gemma4-text-dense-tiny")
    assert dict(case.model.overrides) == {"sliding_window": 8, "enable_moe_block": False}
    assert (case.inputs.batch, case.inputs.seq_len, case.inputs.pad_tail, case.dtype, case.seed) == (2, 40, 5, "float32", 0)
    inputs = kinds.KINDS["text"].inputs(SimpleNamespace(vocab_size=320, pad_token_id=0), case, case.seed, "cpu")
    assert inputs["input_ids"].shape == (2, 40) and inputs["attention_mask"].sum(1).tolist() == [40, 35]
    gates = case.to_dict()["gates"]
    assert gates["float32"] == {"rel_l2": 1e-5, "logits_rel_l2": 1e-5, "kl_max": 1e-6}
    assert set(gates) == {"float32", "bfloat16", "exact"}


# ---------------------------------------------------------------------------------------------------
# Loading, lookup, immutability

def test_load_by_path_and_by_name(tmp_path, monkeypatch):
    path = write(tmp_path, VALID)
    assert C.load_case(path).name == "x-tiny"
    monkeypatch.setenv("PARITY_CASES_DIR", str(tmp_path))
    assert C.cases_dir() == tmp_path
    assert C.load_case("x-tiny").path == path
    assert [c.name for c in C.list_cases()] == ["x-tiny"]


def test_unknown_case_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PARITY_CASES_DIR", str(tmp_path))
    write(tmp_path, VALID)
    with pytest.raises(CaseError) as e:
        C.load_case("nope")
    assert "\n" not in str(e.value) and "'nope'" in str(e.value) and "x-tiny" in str(e.value)
    assert isinstance(e.value, UserError)


def test_case_is_frozen():
    case = C.load_case("gemma4-text-dense-tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        case.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        case.inputs.batch = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        case.model.overrides["enable_moe_block"] = True
    assert hash(case) == hash(C.load_case("gemma4-text-dense-tiny"))
    assert dict(case.inputs)["seq_len"] == 40 and case.inputs["batch"] == 2


def test_replace_revalidates():
    case = C.load_case("gemma4-text-tiny")
    longer = case.replace(inputs={"seq_len": 2048}, dtype="bfloat16")
    assert (longer.inputs.seq_len, longer.inputs.pad_tail, longer.dtype) == (2048, 5, "bfloat16")
    assert case.inputs.seq_len == 40
    with pytest.raises(CaseError, match=r"inputs\.pad_tail"):
        case.replace(inputs={"pad_tail": 40})


def test_to_dict_round_trips(tmp_path):
    case = C.load_case(write(tmp_path, VLM))
    again = C.parse_case(case.to_dict(), source="again")
    assert again == case


def test_requirements():
    tiny, big = C.load_case("gemma4-text-tiny"), C.load_case("gemma4-26b-a4b")
    tp2, ckpt = C.load_case("gemma4-26b-a4b-tp2"), C.load_case("gemma4-checkpoint")
    assert C.default_device(tiny, cuda_available=False) == "cpu"
    assert C.default_device(tiny, cuda_available=True) == "cuda"
    assert C.default_device(big, cuda_available=False) == "cuda"
    ok = dict(checkpoint=None, cuda_available=True, device_count=1)
    assert C.unmet_requirement(tiny, device="cpu", **ok) is None
    assert C.unmet_requirement(big, device="cuda", **{**ok, "cuda_available": False}) == \
        "needs CUDA (case gemma4-26b-a4b)"
    assert C.unmet_requirement(big, device="cpu", **ok) == "needs CUDA (case gemma4-26b-a4b)"
    assert "needs 2 CUDA GPUs" in C.unmet_requirement(tp2, device="cuda", **ok)
    assert C.unmet_requirement(tp2, device="cuda", **{**ok, "device_count": 2}) is None
    assert "GEMMA4_CHECKPOINT" in C.unmet_requirement(ckpt, device="cpu", **ok)
    assert C.unmet_requirement(ckpt, device="cpu", **{**ok, "checkpoint": "/x"}) is None


def test_checkpoint_from_env(monkeypatch):
    ckpt, tiny = C.load_case("gemma4-checkpoint"), C.load_case("gemma4-text-tiny")
    monkeypatch.delenv("GEMMA4_CHECKPOINT", raising=False)
    assert C.checkpoint_for(ckpt, None) is None
    monkeypatch.setenv("GEMMA4_CHECKPOINT", "/ckpt")
    assert C.checkpoint_for(ckpt, None) == "/ckpt" and C.checkpoint_for(ckpt, "/other") == "/other"
    assert C.checkpoint_for(tiny, None) is None


def test_run_ids():
    tiny, bf16 = C.load_case("gemma4-text-tiny"), C.load_case("gemma4-text-tiny-bf16")
    assert C.run_id(tiny) == C.run_id(tiny, "float32") == "gemma4-text-tiny"
    assert C.run_id(tiny, "bfloat16") == "gemma4-text-tiny-as-bf16"
    assert C.run_id(bf16, "bfloat16") == "gemma4-text-tiny-bf16"
    assert C.run_id(bf16, "float32") == "gemma4-text-tiny-bf16-as-fp32"


# ---------------------------------------------------------------------------------------------------
# Bad case files: one line, naming the file and the field

BAD = [
    # (edit of VALID, field named in the message)
    (lambda t: t.replace('name = "x-tiny"\n', ""), "name: missing"),
    (lambda t: t.replace('name = "x-tiny"', 'name = "other"'), "name: must equal the file name"),
    (lambda t: t.replace('description = "a test case"', 'description = ""'), "description"),
    (lambda t: t.replace('kind = "text"', 'kind = "audio"'), "kind: expected one of text, vlm"),
    (lambda t: t.replace('devices = ["cpu", "cuda"]', 'devices = ["tpu"]'), "devices: unknown value 'tpu'"),
    (lambda t: t.replace('devices = ["cpu", "cuda"]', "devices = []"), "devices: must not be empty"),
    (lambda t: t.replace('dtype = "float32"', 'dtype = "float16"'), "dtype"),
    (lambda t: t.replace("seed = 0", "seed = true"), "seed: expected an integer"),
    (lambda t: t.replace('markers = ["cpu"]', 'markers = ["fast"]'), "markers: unknown value 'fast'"),
    (lambda t: t.replace("seed = 0", "seed = 0\ncolour = 1"), "colour: unknown field"),
    (lambda t: t.replace('builder = "tiny_text"', 'builder = "huge"'), "model.builder: expected one of"),
    (lambda t: t.replace('builder = "tiny_text"', 'builder = "tiny_vlm"'), "model.builder: 'tiny_vlm' builds a vlm"),
    (lambda t: t.replace("overrides = { sliding_window = 8 }", "overrides = 3"), "model.overrides: must be a table"),
    (lambda t: t.replace("overrides = { sliding_window = 8 }", 'checkpoint_env = "X"'), "model.checkpoint_env: only"),
    (lambda t: t.replace('builder = "tiny_text"\noverrides = { sliding_window = 8 }', 'builder = "checkpoint"'),
     "model.checkpoint_env: missing"),
    (lambda t: t.replace("[model]\nbuilder", "[model]\nsize = 1\nbuilder"), "model.size: unknown field"),
    (lambda t: t.replace("batch = 2", "batch = 0"), "inputs.batch: must be >= 1"),
    (lambda t: t.replace("batch = 2", 'batch = "two"'), "inputs.batch: expected an integer"),
    (lambda t: t.replace("seq_len = 40\n", ""), "inputs.seq_len: missing"),
    (lambda t: t.replace("pad_tail = 5", "pad_tail = 40"), "inputs.pad_tail: must be smaller than inputs.seq_len"),
    (lambda t: t.replace("pad_tail = 5", "pad_tail = 5\nimages = [[[8, 8]]]"), "inputs.images: only for kind"),
    (lambda t: t.replace("pad_tail = 5", "pad_tail = 5\naudio = [[1000], [600]]"), "inputs.audio: only for kind"),
    (lambda t: t.replace("tp = 1", "tp = 2"), "devices: must be [\"cuda\"]"),
    (lambda t: t.replace("ep = 1", "ep = 0"), "parallel.ep: must be >= 1"),
    (lambda t: t.replace('devices = ["cpu", "cuda"]', 'devices = ["cuda"]'), "markers: must include \"gpu\""),
    (lambda t: t.replace('devices = ["cpu", "cuda"]', 'devices = ["cuda"]').replace('markers = ["cpu"]',
                                                                                    'markers = ["cpu", "gpu"]'),
     "markers: has \"cpu\""),
    (lambda t: t.replace("sequential = false", 'sequential = "yes"'), "run.sequential: expected true or false"),
    (lambda t: t.replace("rel_l2 = 1e-5\nlogits", "logits"), "gates.float32.rel_l2: missing"),
    (lambda t: t.replace("kl_max = 1e-6", 'kl_max = "tiny"'), "gates.float32.kl_max: expected a finite number"),
    (lambda t: t.replace("floor_multiplier = 4.0", "floor_multiplier = 0"), "gates.bfloat16.floor_multiplier: must be > 0"),
    (lambda t: t.replace("floor_abs = 1e-3", "floor_abs = -1.0"), "gates.bfloat16.floor_abs: must be >= 0"),
    (lambda t: t.replace("floor_abs = 1e-3", "floor_abs = nan"), "gates.bfloat16.floor_abs: expected a finite"),
    (lambda t: t[: t.index("[gates.bfloat16]")], "gates.bfloat16: missing"),
    (lambda t: t.replace('exact = ["model.embed_tokens"]', "exact = [1]"), "gates.exact: expected a list of strings"),
    (lambda t: t.replace("[gates.float32]", "[gates.float32]\nrel_l1 = 1.0"), "gates.float32.rel_l1: unknown field"),
    (lambda t: t.replace("seed = 0", "seed = "), "invalid TOML"),
    (lambda t: t.replace("[model]", '[system]\nname = "nemo"\n\n[model]'),
     "system.name: unknown system under test 'nemo' (known: megatron-bridge, parity)"),
    (lambda t: t.replace("[model]", '[system]\nsystem = "parity"\n\n[model]'), "system.system: unknown field"),
    (lambda t: t + '\n[lora]\ntargets = ["qkv"]\nr = 4\nalpha = 8\n', "lora.targets: unknown value 'qkv'"),
    (lambda t: t + '\n[lora]\ntargets = ["q_proj"]\nr = 0\nalpha = 8\n', "lora.r: must be >= 1"),
    (lambda t: t + '\n[lora]\ntargets = ["q_proj"]\nr = 4\nalpha = 8\ndropout = 1.0\n', "lora.dropout: must be in"),
]


def test_lora_table(tmp_path):
    case = C.load_case_file(write(tmp_path, VALID + '\n[lora]\ntargets = ["q_proj", "o_proj"]\nr = 4\nalpha = 8\n'))
    assert (case.lora.targets, case.lora.r, case.lora.scale, case.lora.dropout, case.lora.seed) == (
        ("q_proj", "o_proj"), 4, 2.0, 0.0, 0)
    assert C.load_case_file(write(tmp_path, VALID)).lora is None


@pytest.mark.parametrize("edit, expected", BAD, ids=[b[1].split(":")[0].replace(" ", "_") for b in BAD])
def test_bad_case_file(tmp_path, edit, expected):
    path = write(tmp_path, edit(VALID))
    with pytest.raises(CaseError) as e:
        C.load_case_file(path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") or message.startswith("x-tiny.toml: ")
    assert expected in message, message


VLM_BAD = [
    (lambda t: t.replace("images = [[[24, 32], [16, 16]], [[32, 24]]]", ""), "inputs.images: missing"),
    (lambda t: t.replace("[[32, 24]]]", "]"), "inputs.images: has 1 sequences of images but inputs.batch is 2"),
    (lambda t: t.replace("[16, 16]", "[16, 0]"), "inputs.images: sequence 0: expected [height, width]"),
    (lambda t: t.replace("[[32, 24]]", "[]"), "inputs.images: sequence 1: expected a non-empty list"),
    (lambda t: t.replace("images =", "pad_tail = 2\nimages ="), "inputs.pad_tail: needs inputs.seq_len"),
    (lambda t: t.replace("images =", "max_soft_tokens = 256\nimages ="),
     "inputs.max_soft_tokens: must be one of 70, 140, 280, 560, 1120 (HF's image processor), got 256"),
    (lambda t: t.replace("images =", "audio = [[1000]]\nimages ="),
     "inputs.audio: expected 2 lists (one per sequence) of clip durations in ms (100..30000)"),
    (lambda t: t.replace("images =", "audio = [[1000], [50]]\nimages ="), "inputs.audio: expected 2 lists"),
]


@pytest.mark.parametrize("edit, expected", VLM_BAD)
def test_bad_vlm_case_file(tmp_path, edit, expected):
    assert C.load_case_file(write(tmp_path, VLM)).inputs.images == (((24, 32), (16, 16)), ((32, 24),))
    with pytest.raises(CaseError) as e:
        C.load_case_file(write(tmp_path, edit(VLM)))
    assert "\n" not in str(e.value) and expected in str(e.value), str(e.value)


def test_missing_file_is_a_case_error(tmp_path):
    with pytest.raises(CaseError, match="no such case file"):
        C.load_case(tmp_path / "absent.toml")


# Any value at any leaf either validates or gives one CaseError line: never another exception.
_LEAVES = [(sec, key) for sec, table in tomllib.loads(VALID).items() if isinstance(table, dict)
           for key in table if not isinstance(table[key], dict)] + \
          [(None, key) for key, v in tomllib.loads(VALID).items() if not isinstance(v, dict)] + \
          [("gates.float32", k) for k in ("rel_l2", "logits_rel_l2", "kl_max")] + \
          [("gates.bfloat16", k) for k in ("floor_multiplier", "floor_abs", "logits_kl_max")]
_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                    max_size=2), max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(leaf=st.sampled_from(_LEAVES), value=_VALUES)
def test_any_leaf_value_validates_or_fails_in_one_line(leaf, value):
    data = tomllib.loads(VALID)
    section, key = leaf
    table = data
    for part in (section.split(".") if section else []):
        table = table[part]
    table[key] = value
    try:
        C.parse_case(data, source="x.toml", stem="x-tiny")
    except CaseError as e:
        assert "\n" not in str(e) and str(e).startswith("x.toml: ")


def test_padding_lengths_and_offsets_validate():
    case = C.load_case("gemma4-text-tiny-padded")
    assert (case.inputs.padding, case.inputs.lengths, case.inputs.position_offset) == ("left", (40, 29, 13), 5)
    with pytest.raises(CaseError, match=r"inputs\.padding: expected one of right, left"):
        case.replace(inputs={"padding": "middle"})
    with pytest.raises(CaseError, match=r"inputs\.lengths: expected 3 integers in 1\.\.inputs\.seq_len \(40\)"):
        case.replace(inputs={"lengths": [40, 29]})
    with pytest.raises(CaseError, match=r"inputs\.lengths: give either inputs\.lengths or inputs\.pad_tail"):
        case.replace(inputs={"pad_tail": 3})
    with pytest.raises(CaseError, match=r"inputs\.lengths: only for kind 'text'"):
        C.load_case("gemma4-vlm-tiny").replace(inputs={"lengths": [10, 10]})
    assert C.load_case("gemma4-text-tiny").inputs.padding == "right"  # the former layout by default


def test_system_section_and_its_override(tmp_path):
    assert C.load_case_file(write(tmp_path, VALID)).system.name == "parity"  # the default
    case = C.load_case_file(write(tmp_path, VALID.replace("[model]", '[system]\nname = "megatron-bridge"\n\n[model]')))
    assert case.system.name == "megatron-bridge" and case.to_dict()["system"] == {"name": "megatron-bridge"}
    assert C.system_for(case, None) == "megatron-bridge" and C.system_for(case, "parity") == "parity"
    assert case.replace(system={"name": "parity"}).system.name == "parity"
    with pytest.raises(UserError, match="unknown system under test 'nemo'"):
        C.system_for(case, "nemo")
    shipped = C.load_case("gemma4-text-tiny-megatron-bridge")
    assert shipped.system.name == "megatron-bridge" and C.load_case("gemma4-text-tiny").system.name == "parity"
    assert dataclasses.replace(shipped, name="gemma4-text-tiny", description="", system=C.SystemSpec(),
                               expected_failures=C.FrozenDict()) == \
        dataclasses.replace(C.load_case("gemma4-text-tiny"), description="")  # the same case otherwise
    assert set(shipped.expected_failures) == {"modules"} and "finding 2" in shipped.expected_failures["modules"]
    with pytest.raises(C.CaseError, match="expected_failures.speed: unknown check"):
        C.load_case_file(write(tmp_path, VALID + '\n[expected_failures]\nspeed = "x"\n'))


def test_the_26b_vlm_case_builds_the_real_shape_and_the_processors_token_counts():
    """``full_vlm``: the 26B-A4B-it shape (25.8 B parameters, the 27-layer 1152-wide tower: 0.57 B), built on the meta
    device; its two images get the soft-token counts HF's processor gives them at its default budget of 280
    (768x768 -> 768x768: 2,304 patches, 256 tokens; 512x1024 -> 528x1104: 2,277 patches, 253 tokens)."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from parity.engine.vlm_inputs import build_vlm_inputs
    from parity.vlm_config import full_vlm_config_kwargs, make_vlm_config, soft_tokens_per_image

    case = C.load_case("gemma4-26b-a4b-vlm")
    config = make_vlm_config(full_vlm_config_kwargs(**case.model.overrides))
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 25.81
    assert round(sum(p.numel() for p in model.model.vision_tower.parameters()) / 1e9, 2) == 0.57
    inputs = build_vlm_inputs(config, seed=0, image_sizes=case.inputs.images, text_runs=[[5, 4, 6]],
                              max_soft_tokens=case.inputs.max_soft_tokens)
    assert soft_tokens_per_image(inputs["image_position_ids"], config.vision_config.pooling_kernel_size) == [256, 253]
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 256 + 253
