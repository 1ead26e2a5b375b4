"""Errors planted in the HF reference are caught and localised with the megatron-bridge system as well as with
ours (issue 12): each plant patches one HF Gemma 4 class for one run of the tiny fp32 text case."""
from __future__ import annotations

import math

import pytest

from parity import mbridge
from parity.cases import load_case
from parity.engine.pipeline import run

from tests.plants import BRIDGE_PLANTS, bridge_probing_finding, failing, first_new
from test_engine import assert_localised, hf_router_without_per_expert_scale

OK, WHY = mbridge.available()
SYSTEMS = ["parity", pytest.param("megatron-bridge", marks=pytest.mark.skipif(
    not OK, reason=f"Megatron-Bridge not importable: {WHY}"))]


def _run(system: str) -> dict:
    return run(load_case("gemma4-text-tiny"), device="cpu", system=system)


_CLEAN: dict[str, set] = {}


def _known(system: str) -> set:
    """(name, mode) of the rows failing in the clean run of ``system``: Megatron-Bridge's probing rows show its
    findings 2 and 10 (``tests.plants.bridge_probing_finding``); ours has none."""
    if system not in _CLEAN:
        _CLEAN[system] = failing(_run(system))
    return _CLEAN[system]


def assert_localised_new(r: dict, where: str, system: str) -> dict:
    """``assert_localised`` where the clean run passes; else the plant's first *new* divergence (``first_new``,
    as ``scripts/gpu_plants.py`` judges a system with findings) is ``where``."""
    known = _known(system)
    if not known:
        return assert_localised(r, where)
    assert r["passed"] is False
    detail = first_new(r, known)
    assert detail.get("name") == where, detail
    value = detail["value"]
    assert value is None or math.isnan(value) or value > detail["gate"] or detail["why"], detail
    return detail


def experts_output_scaled(mp):
    from transformers.models.gemma4 import modeling_gemma4 as hf
    forward = hf.Gemma4TextExperts.forward
    mp.setattr(hf.Gemma4TextExperts, "forward", lambda self, *a, **kw: forward(self, *a, **kw) * 1.01)  # BUG


def _after_init(mp, cls_name, fn):
    from transformers.models.gemma4 import modeling_gemma4 as hf
    cls = getattr(hf, cls_name)
    init = cls.__init__

    def planted(self, *a, **kw):
        init(self, *a, **kw)
        fn(self)
    mp.setattr(cls, "__init__", planted)


def dropped_post_attention_norm(mp):  # BUG: layer 3's post-attention norm is the identity (weights still loaded)
    def fn(layer):
        if layer.layer_idx == 3:
            layer.post_attention_layernorm.forward = lambda x: x
    _after_init(mp, "Gemma4TextDecoderLayer", fn)


def v_norm_skipped(mp):  # BUG: layer 0 skips v_norm
    def fn(attn):
        if attn.layer_idx == 0:
            attn.v_norm.forward = lambda x: x
    _after_init(mp, "Gemma4TextAttention", fn)


def missing_final_softcap(mp):  # BUG: HF's causal LM head skips the tanh softcap (its own config copy only)
    import copy

    def fn(lm):
        lm.config = copy.copy(lm.config)
        lm.config.final_logit_softcapping = None
    _after_init(mp, "Gemma4ForCausalLM", fn)


def rope_positions_doubled(mp):  # BUG: HF's rotary tables for positions 2p (a shift p + c would be no error:
    from transformers.models.gemma4 import modeling_gemma4 as hf  # RoPE scores depend on differences only)
    forward = hf.Gemma4TextRotaryEmbedding.forward
    mp.setattr(hf.Gemma4TextRotaryEmbedding, "forward",
               lambda self, x, position_ids, layer_type=None: forward(self, x, position_ids * 2, layer_type))


def sliding_window_widened(mp):  # BUG: HF's sliding layers see W+1 keys (its mask built from a config copy)
    import copy

    from transformers.models.gemma4 import modeling_gemma4 as hf
    make = hf.create_sliding_window_causal_mask

    def planted(config, **kw):
        config = copy.copy(config)
        config.sliding_window += 1
        return make(config=config, **kw)
    mp.setattr(hf, "create_sliding_window_causal_mask", planted)


PLANTS = {"missing_final_softcap": (missing_final_softcap, "logits"),
          # ours exposes its RoPE tables (a table row); Megatron-Bridge computes them inside its attention: its
          # self_attention replayed alone on HF's layer-0 input disagrees (o_proj, replayed on HF's own o_proj
          # input, passes: it only received the wrong attention context end to end)
          "rope_positions_doubled": (rope_positions_doubled, {"parity": "model.rotary_emb",
                                                              "megatron-bridge": "model.layers.0.self_attn"}),
          "dropped_post_attention_norm": (dropped_post_attention_norm, "model.layers.3.post_attention_layernorm"),
          # an inline step of attention: both systems' attention replayed alone disagree, their o_proj does not
          "v_norm_skipped": (v_norm_skipped, "model.layers.0.self_attn"),
          # each system's own mask of the sliding layers (its core attention's window) against the one HF's
          # layer 0 received: the table row, ordered first inside that attention
          "sliding_window_widened": (sliding_window_widened, "model.layers.0.self_attn", "masks[sliding_attention]"),
          "router_without_per_expert_scale": (hf_router_without_per_expert_scale, "model.layers.0.router"),
          "experts_output_scaled": (experts_output_scaled, "model.layers.0.experts")}


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_hf_plant_is_localised(monkeypatch, plant, system):
    fn, where, *megatron_name = PLANTS[plant]
    _known(system)  # the clean run first, before anything is planted
    fn(monkeypatch)
    r = _run(system)
    assert r["system"]["name"] == system
    detail = assert_localised_new(r, where if isinstance(where, str) else where[system], system)
    if megatron_name:
        assert detail["megatron_name"] == megatron_name[0], detail


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_run_passes(system, seed):  # the plants above fail a case that is clean on several seeds
    r = run(load_case("gemma4-text-tiny"), device="cpu", system=system, seed=seed)
    assert r["summary"]["logits"]["rel_l2"] < 1e-5
    assert all(m["passed"] for m in r["modules"] if m["mode"] != "probing"), r["summary"]
    if system == "parity":
        assert r["passed"] is True and r["summary"]["first_divergence"] is None, r["summary"]
        assert r["summary"]["n_failed"] == 0
    else:  # its probing rows show its findings, and nothing else
        assert all(bridge_probing_finding(m) in (2, 10) for m in r["modules"] if not m["passed"]), r["summary"]



@pytest.mark.skipif(not OK, reason=f"Megatron-Bridge not importable: {WHY}")
@pytest.mark.parametrize("plant", BRIDGE_PLANTS, ids=lambda p: p.name)
def test_bridge_plant_is_localised_by_its_replay(monkeypatch, plant):
    """A weight planted in Megatron-Bridge's model where its forward fuses or inlines the HF module (tests/plants.py
    BRIDGE_PLANTS) is localised by the isolated replay of the part that holds it, not merely downstream."""
    _known("megatron-bridge")  # the clean run first, before anything is planted
    plant.plant(monkeypatch)
    r = _run("megatron-bridge")
    detail = assert_localised_new(r, plant.where, "megatron-bridge")
    assert detail["mode"] == "isolated" and detail["megatron_name"] == plant.megatron_name, detail


@pytest.mark.skipif(not OK, reason=f"Megatron-Bridge not importable: {WHY}")
def test_bridge_bf16_error_under_the_noise_is_caught_by_its_fp32_replay(monkeypatch):
    """Its layers are replayed in fp32 too (``MegatronBridgeSystem.fp32``): an exact-erf GELU in place of its tanh
    one (a ~2e-4 change, under the bf16 noise floors) fails the bf16 tiny run at the first MLP (the activation is
    an inline step of it: its down_proj, replayed on HF's activation output, agrees), in fp32_replay only."""
    import torch

    from parity.mbridge import model as MB

    configure = MB._configure

    def planted(provider, *a, **kw):
        configure(provider, *a, **kw)
        provider.activation_func = torch.nn.functional.gelu  # BUG: erf GELU, HF's is the tanh approximation
    monkeypatch.setattr(MB, "_configure", planted)
    r = run(load_case("gemma4-text-tiny-bf16"), device="cpu", system="megatron-bridge")
    known = {("model.embed_tokens", "end_to_end"), ("model.embed_tokens", "isolated")}  # finding 3, clean runs too
    known |= {(f"model.layers.{i}.{m}", "probing") for i in range(6) for m in ("post_attention_layernorm",
                                                                              "self_attn")}  # findings 2 and 10
    first = first_new(r, known)
    assert first["name"] == "model.layers.0.mlp" and first["mode"] == "fp32_replay", first
    assert first["value"] > 1e-5 and first["megatron_name"] == "decoder.layers.0.mlp.shared_experts"
    iso = {m["name"]: m for m in r["modules"] if m["mode"] == "isolated"}
    assert iso["model.layers.0.mlp"]["passed"]  # the bf16 gates alone do not see it
