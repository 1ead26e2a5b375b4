"""Gemma 4 audio (issue 24): HF's ``Gemma4AudioModel`` + ``embed_audio`` + the audio-token scatter against our
Megatron audio tower (``parity.models.audio``) on CPU.

- the audio weight mapping covers every HF audio tensor and round-trips bit for bit;
- the raw audio inputs are laid out as HF's processor lays them out (soft-token counts, mm_token_type_ids 3);
- the fp32 audio case passes with every audio module compared in both modes (bit-identical here);
- each planted audio error (``tests.plants.AUDIO_PLANTS``) fails at exactly its module;
- configs the tower cannot compute are refused in one line;
- Megatron-Bridge 0.6.2 on the audio case: finding 17 (its VLM drops ``input_features_mask``).
"""
from __future__ import annotations

import pytest
import torch

from parity.cases import load_case
from parity.engine.launch import execute
from tests.plants import AUDIO_CASE, AUDIO_PLANTS


def _explain(r: dict) -> str:
    bad = sorted((m for m in r["modules"] if not m["passed"]), key=lambda m: (m["order"], m["mode"] != "isolated"))
    return f"passed={r['passed']} first={r['summary']['first_divergence']!r} " + "; ".join(
        f"{m['name']} [{m['mode']}] rel_l2={m['rel_l2']}" for m in bad[:5])


@pytest.fixture(scope="module")
def clean():
    return execute(load_case(AUDIO_CASE), device="cpu")


def test_audio_mapping_round_trip_is_bit_exact():
    from transformers import Gemma4ForConditionalGeneration

    from parity import megatron_env
    from parity.bridge.audio import hf_to_megatron_audio, megatron_to_hf_audio
    from parity.engine.randomize import randomize_
    from parity.models.audio import Gemma4AudioTowerMC
    from parity.vlm_config import AudioArgs, make_vlm_config, vlm_audio_config_kwargs

    megatron_env.init()
    config = make_vlm_config(vlm_audio_config_kwargs())
    hf = Gemma4ForConditionalGeneration._from_config(config, attn_implementation={
        "": "sdpa", "text_config": "sdpa", "vision_config": "sdpa", "audio_config": "eager"})
    randomize_(hf, seed=3)
    state = hf.state_dict()
    ours = Gemma4AudioTowerMC(AudioArgs.from_hf(config))
    missing, unexpected = ours.load_state_dict(hf_to_megatron_audio(state), strict=False)
    assert [k for k in missing if not k.endswith("_extra_state")] == [] and unexpected == []
    back = megatron_to_hf_audio(ours.state_dict())
    audio_keys = {k for k in state if k.startswith(("model.audio_tower.", "model.embed_audio."))}
    assert set(back) == audio_keys and len(audio_keys) == 132  # 2 layers x 62 + subsampling 5 + output 2 + embed 1
    assert all(torch.equal(back[k], state[k]) for k in audio_keys)


def test_audio_inputs_are_laid_out_as_the_processor_does():
    from parity.engine.kinds import KINDS
    from parity.engine.vlm_inputs import audio_tokens
    from parity.vlm_config import make_vlm_config, vlm_audio_config_kwargs

    case = load_case(AUDIO_CASE)
    config = make_vlm_config(vlm_audio_config_kwargs())
    inputs = KINDS["vlm"].inputs(config, case, 0, "cpu")
    feats, mask = inputs["input_features"], inputs["input_features_mask"]
    assert feats.shape == (2, 99, 128) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [99, 59]  # 1000 ms and 600 ms at a 10 ms hop, 20 ms frames
    assert bool((feats[1, 59:] == 0).all())  # padded frames zeroed, as the extractor does
    tokens = audio_tokens(mask).sum(1).tolist()
    assert tokens == [25, 15]
    ids, mm = inputs["input_ids"], inputs["mm_token_type_ids"]
    assert (ids == config.audio_token_id).sum(1).tolist() == tokens
    assert bool(((mm == 3) == (ids == config.audio_token_id)).all())
    for b, n in enumerate(tokens):  # BOA, n audio tokens, EOA
        at = (ids[b] == config.boa_token_id).nonzero().flatten().tolist()
        assert len(at) == 1 and ids[b, at[0] + n + 1] == config.eoa_token_index


def test_audio_case_passes_with_every_audio_module_compared(clean):
    r = clean
    assert r["passed"] is True, _explain(r)
    audio = [m for m in r["modules"] if m["group"] == "audio"]
    by_mode = {mode: [m for m in audio if m["mode"] == mode] for mode in ("end_to_end", "isolated")}
    assert len(by_mode["end_to_end"]) == 87 and len(by_mode["isolated"]) == 86  # + the blocked mask (a table row)
    assert max(m["rel_l2"] for m in audio) <= 1e-6  # bit-identical on the maintainer's machine (0.0)
    mask = [m for m in audio if m["kind"] == "mask"]
    assert len(mask) == 1 and mask[0]["rel_l2"] == 0.0 and mask[0]["detail"].endswith(": 0 mismatching entries")
    merged = [m for m in r["modules"] if m["name"] == "merged_embeddings"]
    assert {m["megatron_name"] for m in merged} == {"audio_scatter"} and all(m["passed"] for m in merged)
    assert r["roundtrip"]["bit_exact"] == len(r["roundtrip"]["rows"]) == 351
    assert r["inputs"]["audio_soft_tokens"] == [25, 15]


@pytest.mark.parametrize("plant", AUDIO_PLANTS, ids=[p.name for p in AUDIO_PLANTS])
def test_audio_plant_fails_at_its_module(plant, monkeypatch, clean):
    plant.plant(monkeypatch)
    r = execute(load_case(AUDIO_CASE), device="cpu")
    assert r["passed"] is False, _explain(r)
    assert r["summary"]["first_divergence"] == plant.where, _explain(r)
    detail = r["summary"]["first_divergence_detail"]
    if plant.megatron_name is not None:
        assert detail["megatron_name"] == plant.megatron_name, detail
    first = min(m["order"] for m in r["modules"] if m["name"] == plant.where and not m["passed"])
    upstream = [m for m in r["modules"] if m["mode"] == "isolated" and m["order"] < first]
    assert upstream and all(m["passed"] for m in upstream), _explain(r)  # every module before it still matches alone


@pytest.mark.parametrize("override, what", [
    (dict(hidden_act="gelu"), "audio hidden_act='gelu'"),
    (dict(attention_context_left=9), "relative positions only line up"),
])
def test_unsupported_audio_configs_are_refused_in_one_line(override, what):
    from parity.config import UnsupportedConfig
    from parity.vlm_config import check_supported_vlm
    from parity.vlm_config import make_vlm_config, vlm_audio_config_kwargs

    with pytest.raises(UnsupportedConfig, match="unsupported Gemma 4 feature") as e:
        check_supported_vlm(make_vlm_config(vlm_audio_config_kwargs(audio=override)))
    assert what in str(e.value) and "\n" not in str(e.value)
    check_supported_vlm(make_vlm_config(vlm_audio_config_kwargs()))  # the tiny audio config itself is supported


def test_finding_17_bridge_drops_the_audio_frame_mask():
    """Megatron-Bridge's Gemma4VLModel.forward takes ``input_features`` but no ``input_features_mask``: HF's audio
    tower inside it runs on the padded frames and every frame is scattered, so a batch of clips of different
    lengths raises its own count check (40 audio tokens, 50 frames)."""
    from parity import mbridge

    ok, why = mbridge.available()
    if not ok:
        pytest.skip(why)
    r = execute(load_case(AUDIO_CASE), device="cpu", system="megatron-bridge")
    assert r["passed"] is False
    text = str(r["summary"])
    assert "audio token count mismatch: 40 audio_token_id positions vs 50 tokens from audio encoder" in text, text
    shared = [m for m in r["modules"] if m["group"] == "audio" and m["mode"] == "isolated"]
    assert len(shared) == 86 and all(m["passed"] for m in shared)  # HF's own tower inside it; its embed_audio


@pytest.mark.parametrize("supports_sdpa, expected", [(False, "eager"), (True, "sdpa")])
def test_the_audio_tower_gets_the_attention_its_class_declares(monkeypatch, supports_sdpa, expected):
    """transformers 5.2x declares eager alone (its attention reads an additive mask); 5.17 leaves SDPA (boolean masks,
    which its attention reads): forcing eager there inverted HF's own audio attention (found on an H100)."""
    from transformers.models.gemma4 import modeling_gemma4 as m

    from parity.engine.kinds import audio_attention

    monkeypatch.setattr(m.Gemma4AudioModel, "_supports_sdpa", supports_sdpa, raising=False)
    assert audio_attention() == expected


def test_the_installed_audio_tower_reads_the_mask_format_it_is_built_with():
    """Whatever the installed transformers: the harness builds HF's audio tower for the mask format its attention
    reads (boolean where it applies ``logical_not``, additive where it tests ``!= 0``)."""
    import inspect

    from transformers.models.gemma4 import modeling_gemma4 as m

    from parity.engine.kinds import audio_attention

    src = inspect.getsource(m.Gemma4AudioAttention.forward)
    reads_bool = "logical_not" in src
    assert (audio_attention() == "sdpa") == reads_bool, (audio_attention(), "bool" if reads_bool else "additive")
