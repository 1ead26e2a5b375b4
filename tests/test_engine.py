"""Acceptance tests of the comparison engine: checked independently, including with discrepancies planted
on one side.

Each planted test runs the real engine (``parity.engine.pipeline.run``) on the tiny text case with one bug planted through
``monkeypatch`` in a single HF or Megatron module, and asserts that the run fails, that
``summary.first_divergence`` names exactly *that* module (not a later one; an inline step by the name of
its nearest module, docs/reading-reports.md), and that the failing row's metric really exceeds its gate. The clean runs
(fp32 and bf16) are shared by a module fixture.
"""
from __future__ import annotations

import math

import pytest
import torch

from parity.cases import load_case
from parity.config import text_config_kwargs
from parity.engine.alignment import TABLE_KINDS, expand
from parity.engine.kinds import KINDS
from parity.engine.pipeline import run
from parity.errors import UserError

_TINY = text_config_kwargs(**load_case("gemma4-text-tiny").model.overrides)
GLOBAL_HD = _TINY["global_head_dim"]
SLIDING_HD = _TINY["head_dim"]
ROT = int(_TINY["rope_parameters"]["full_attention"]["partial_rotary_factor"] * GLOBAL_HD)
FULL_LAYERS = [i for i, t in enumerate(_TINY["layer_types"]) if t == "full_attention"]
assert GLOBAL_HD != SLIDING_HD and 0 < ROT < GLOBAL_HD and FULL_LAYERS[0] == 2  # what the plants rely on


def _run(case: str = "gemma4-text-tiny", **sections) -> dict:
    c = load_case(case)
    return run(c.replace(**sections) if sections else c, device="cpu")


def _failing(r: dict) -> list[dict]:
    return sorted((m for m in r["modules"] if not m["passed"]), key=lambda m: (m["order"], m["mode"] != "isolated"))


def _explain(r: dict) -> str:
    rows = [f"{m['name']} [{m['mode']}, {m['megatron_name']}] order={m['order']} "
            f"{m['gate']['metric']}={m.get(m['gate']['metric'])} gate={m['gate']['max']}" for m in _failing(r)[:8]]
    return f"first_divergence={r['summary']['first_divergence']!r}; earliest failing rows:\n  " + "\n  ".join(rows)


def _exceeds(row: dict) -> bool:
    g = row["gate"]
    value = row.get(g["metric"])
    return value is None or (isinstance(value, float) and math.isnan(value)) or value > g["max"] or bool(row.get("why"))


def assert_localised(r: dict, name: str) -> dict:
    """The run fails, ``first_divergence`` is ``name``, and the row it names really exceeds its gate."""
    assert r["passed"] is False, _explain(r)
    assert r["summary"]["first_divergence"] == name, _explain(r)
    detail = r["summary"]["first_divergence_detail"]
    assert detail["name"] == name
    rows = [m for m in r["modules"] if m["name"] == name and not m["passed"]]
    assert rows, _explain(r)
    for row in rows:
        assert _exceeds(row), row
    value = detail["value"]
    assert value is None or math.isnan(value) or value > detail["gate"] or detail["why"], detail
    return detail


# An inline step of attention (RoPE on q/k, the V path, the softmax) has no module of its own: its bug makes
# ``self_attn.o_proj`` fail end_to_end only (its isolated replay passes), and gates.summarise then names the
# parent ``self_attn`` (docs/reading-reports.md: the deepest failing module wins), not the o_proj that merely received wrong inputs.


# ---------------------------------------------------------------------------------------------------
# Clean runs (shared)

@pytest.fixture(scope="module")
def clean_fp32() -> dict:
    return _run(run={"sequential": True})  # also proves the HF model is released before Megatron is built


@pytest.fixture(scope="module")
def clean_bf16() -> dict:
    return _run("gemma4-text-tiny-bf16")


def test_clean_fp32_passes_every_row_in_both_modes(clean_fp32):
    r = clean_fp32
    assert r["passed"] is True, _explain(r)
    assert r["summary"]["first_divergence"] is None
    assert all(r["checks"].values()), r["checks"]
    from parity.config import TextArgs

    case = load_case("gemma4-text-tiny")
    _model, config = KINDS["text"].build(case, torch.float32, "cpu", None, case.seed)
    table = {a.hf for a in expand(KINDS["text"].prefixes, TextArgs.from_hf(config)) if a.row.kind not in TABLE_KINDS}
    assert {"model.embed_tokens", "model.layers.5.experts", "lm_head", "logits"} <= table
    for mode in ("isolated", "end_to_end"):
        seen = {m["name"] for m in r["modules"] if m["mode"] == mode}
        assert table <= seen, (mode, sorted(table - seen))
    # the masks and RoPE tables are compared as their own rows too
    tables = {(m["megatron_name"], m["name"]) for m in r["modules"] if m["kind"] in ("rope", "mask")}
    assert {("rotary_tables[sliding_attention]", "model.rotary_emb"),
            ("rotary_tables[full_attention]", "model.rotary_emb"),
            ("masks[sliding_attention]", "model.layers.0.self_attn"),
            ("masks[full_attention]", f"model.layers.{FULL_LAYERS[0]}.self_attn")} <= tables
    for m in r["modules"]:
        assert m["passed"], m
        if m["kind"] != "mask":
            assert m["rel_l2"] <= 1e-5, m
    assert r["summary"]["logits"]["rel_l2"] <= 1e-5
    assert r["roundtrip"]["tensors"] > 0 and r["roundtrip"]["bit_exact"] == r["roundtrip"]["tensors"]


def test_sequential_run_releases_hf_before_megatron(clean_fp32):
    assert clean_fp32["sequential"] is True
    assert clean_fp32["hf_released_before_megatron"] is True


def test_clean_bf16_passes_against_its_floor(clean_bf16):
    r = clean_bf16
    assert r["dtype"] == "bfloat16"
    assert r["passed"] is True, _explain(r)
    assert r["summary"]["first_divergence"] is None
    floored = [m for m in r["modules"] if m.get("floor") and m["gate"]["metric"] == "rel_l2"]
    assert len(floored) > 100
    for m in floored:
        assert m["ratio"] is not None and m["ratio"] >= 0, m
        assert m["gate"]["max"] == pytest.approx(min(4.0 * m["floor"] + 1e-3, 0.35)), m  # capped by the ceiling
    emb = [m for m in r["modules"] if m["name"] == "model.embed_tokens"]
    assert {m["mode"] for m in emb} == {"isolated", "end_to_end"}
    for m in emb:
        assert m["gate"] == {"metric": "max_abs", "max": 0.0} and m["max_abs"] == 0.0, m


# ---------------------------------------------------------------------------------------------------
# 1-2. Router

def test_megatron_router_without_scale(monkeypatch):
    import torch.nn.functional as F

    from parity.models import text

    def gating(self, input):  # noqa: A002 - megatron's signature
        x = text.rms_norm(input, self.config.layernorm_epsilon)
        x = x * (self.config.hidden_size**-0.5)  # BUG: `* self.scale` dropped
        return F.linear(x, self.weight)

    monkeypatch.setattr(text.Gemma4Router, "gating", gating)
    r = _run()
    assert_localised(r, "model.layers.0.router")
    assert r["checks"]["router"] is False


def hf_router_without_per_expert_scale(monkeypatch):
    """Plant (HF side, also used by tests/test_megatron_bridge_plants.py): HF's router drops its per-expert scale."""
    from torch import nn
    from transformers.models.gemma4 import modeling_gemma4 as hf

    def forward(self, hidden_states):  # HF's Gemma4TextRouter.forward minus the per-expert scale
        hidden_states = self.norm(hidden_states)
        hidden_states = hidden_states * self.scale * self.scalar_root_size
        expert_scores = self.proj(hidden_states)
        router_probabilities = nn.functional.softmax(expert_scores, dim=-1, dtype=torch.float32)
        top_k_weights, top_k_index = torch.topk(router_probabilities, k=self.config.top_k_experts, dim=-1)
        top_k_weights /= top_k_weights.sum(dim=-1, keepdim=True)
        # BUG: `top_k_weights = top_k_weights * self.per_expert_scale[top_k_index]` dropped
        return router_probabilities, top_k_weights, top_k_index

    monkeypatch.setattr(hf.Gemma4TextRouter, "forward", forward)


def test_hf_router_without_per_expert_scale(monkeypatch):
    hf_router_without_per_expert_scale(monkeypatch)
    r = _run()
    assert_localised(r, "model.layers.0.router")
    # experts under forced (HF's) routing still agree: the expert math is judged apart from routing
    iso = next(m for m in r["modules"] if m["name"] == "model.layers.0.experts" and m["mode"] == "isolated")
    assert iso["passed"], iso


# ---------------------------------------------------------------------------------------------------
# 3. A dropped norm

def test_megatron_dropped_post_attention_norm(monkeypatch):
    from parity.models import text

    init = text.Gemma4Model.__init__

    def planted_init(self, *a, **kw):
        init(self, *a, **kw)
        # BUG: layer 3's post-attention norm is the identity (its hooks still fire: its OUTPUT is wrong)
        self.decoder.layers[3].post_attention_layernorm.forward = lambda x: x

    monkeypatch.setattr(text.Gemma4Model, "__init__", planted_init)
    r = _run()
    assert_localised(r, "model.layers.3.post_attention_layernorm")
    rows = [m for m in r["modules"] if m["name"] == "model.layers.3.post_attention_layernorm"]
    assert {m["mode"] for m in rows if not m["passed"]} == {"isolated", "end_to_end", "probing"}
    assert all(m["passed"] for m in r["modules"] if m["name"] == "model.layers.3.self_attn")


# ---------------------------------------------------------------------------------------------------
# 4. RoPE lanes on the global (proportional) layers

def _megatron_partial_rotary(t, freqs_rot):
    """Megatron's ``rotary_percent``: rotate the first ``rot`` channels with pairs (i, i + rot/2)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t, freqs_rot, rotary_interleaved=False)


def test_rope_megatron_rotary_percent_fails_the_table_row(monkeypatch):
    from parity.models import rope

    inv_freq, rotary_freqs, apply_rotary = rope.inv_freq, rope.rotary_freqs, rope.apply_rotary

    def planted_inv_freq(layer, device=None):
        if layer.rope_type != "proportional":
            return inv_freq(layer, device)
        rot = int(layer.partial_rotary_factor * layer.head_dim)
        exponents = torch.arange(0, rot, 2, dtype=torch.int64, device=device).float() / rot  # BUG: rot denominator
        return 1.0 / (layer.rope_theta**exponents)  # [rot/2]

    def planted_rotary_freqs(layer, position_ids):
        if layer.rope_type != "proportional":
            return rotary_freqs(layer, position_ids)
        f = position_ids.float()[..., None] * planted_inv_freq(layer, position_ids.device)  # [b, s, rot/2]
        pad = f.new_zeros(*f.shape[:-1], layer.head_dim - 2 * f.shape[-1])
        emb = torch.cat([f, f, pad], dim=-1)  # BUG: megatron lanes, first rot channels, pairs (i, i + rot/2)
        return emb.transpose(0, 1)[:, :, None, :].contiguous()

    def planted_apply(t, freqs):
        if t.shape[-1] == GLOBAL_HD:
            return _megatron_partial_rotary(t, freqs[..., :ROT])
        return apply_rotary(t, freqs)

    monkeypatch.setattr(rope, "inv_freq", planted_inv_freq)
    monkeypatch.setattr(rope, "rotary_freqs", planted_rotary_freqs)
    monkeypatch.setattr(rope, "apply_rotary", planted_apply)
    r = _run()
    assert_localised(r, "model.rotary_emb")
    tables = {m["megatron_name"]: m for m in r["modules"] if m["kind"] == "rope" and m["mode"] == "end_to_end"}
    assert tables["rotary_tables[full_attention]"]["passed"] is False
    assert tables["rotary_tables[full_attention]"]["rel_l2"] > 1e-5
    assert tables["rotary_tables[sliding_attention]"]["passed"] is True
    assert r["summary"]["first_divergence_detail"]["megatron_name"] == "rotary_tables[full_attention]"
    # the sliding layers are untouched
    assert all(m["passed"] for m in r["modules"] if m["layer"] in (0, 1))


def test_rope_lane_pairing_only_is_localised_to_first_global_self_attn(monkeypatch):
    from parity.models import rope

    apply_rotary = rope.apply_rotary

    def planted_apply(t, freqs):
        if t.shape[-1] != GLOBAL_HD:
            return apply_rotary(t, freqs)
        half, r2 = GLOBAL_HD // 2, ROT // 2
        same_angles = torch.cat([freqs[..., :r2], freqs[..., half:half + r2]], dim=-1)  # inv_freq values right
        return _megatron_partial_rotary(t, same_angles)  # BUG: pairs (i, i + rot/2) on the first rot lanes

    monkeypatch.setattr(rope, "apply_rotary", planted_apply)
    r = _run()
    assert all(m["passed"] for m in r["modules"] if m["kind"] == "rope")  # the tables are right
    assert_localised(r, f"model.layers.{FULL_LAYERS[0]}.self_attn")


# ---------------------------------------------------------------------------------------------------
# 5. Sliding-window mask off by one

def test_sliding_mask_off_by_one(monkeypatch):
    from parity.models import masks

    build_mask = masks.build_mask

    def planted(seq_len, *, sliding_window, **kw):
        if sliding_window is not None:
            sliding_window = sliding_window + 1  # BUG: window W+1
        return build_mask(seq_len, sliding_window=sliding_window, **kw)

    monkeypatch.setattr(masks, "build_mask", planted)
    r = _run()
    detail = assert_localised(r, "model.layers.0.self_attn")
    assert detail["megatron_name"] == "masks[sliding_attention]"
    full = next(m for m in r["modules"] if m["megatron_name"] == "masks[full_attention]")
    assert full["passed"]


# ---------------------------------------------------------------------------------------------------
# 6. Two experts swapped by the bridge

def test_expert_swap_after_conversion(monkeypatch):
    from parity.bridge import convert

    iter_hf_to_megatron = convert.iter_hf_to_megatron
    swapped = {f"decoder.layers.1.moe.experts.{part}.weight" for part in ("linear_fc1", "linear_fc2")}

    def planted(*a, **kw):
        for key, w in iter_hf_to_megatron(*a, **kw):
            if key in swapped:
                w = w.clone()
                w[[0, 1]] = w[[1, 0]]  # BUG: experts 0 and 1 of layer 1 swapped
            yield key, w

    monkeypatch.setattr(convert, "iter_hf_to_megatron", planted)
    r = _run()
    assert_localised(r, "model.layers.1.experts")
    iso = next(m for m in r["modules"] if m["name"] == "model.layers.1.experts" and m["mode"] == "isolated")
    assert iso["passed"] is False  # under forced identical routing: the expert math itself differs
    rt = r["roundtrip"]
    assert rt["bit_exact"] < rt["tensors"] and r["checks"]["roundtrip"] is False
    bad = {row["name"] for row in rt["rows"] if not row["bit_exact"]}
    assert bad == {"model.layers.1.experts.gate_up_proj", "model.layers.1.experts.down_proj"}, bad


# ---------------------------------------------------------------------------------------------------
# 7. Final softcap missing

def test_missing_final_softcap(monkeypatch):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from parity.models import text

    def output_logits(self, hidden):
        weight = self.embedding.word_embeddings.weight if self.args.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return gather_from_tensor_model_parallel_region(logits).transpose(0, 1)  # BUG: no tanh softcap

    monkeypatch.setattr(text.Gemma4Model, "output_logits", output_logits)
    r = _run()
    assert_localised(r, "logits")
    assert all(m["passed"] for m in r["modules"] if m["name"] == "lm_head")
    assert r["checks"]["logits"] is False


# ---------------------------------------------------------------------------------------------------
# 8. V taken after k_norm on K=V layers

def test_v_after_k_norm_on_k_eq_v_layers(monkeypatch):
    from parity.models import rope, text

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, **_):
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        if self.config.kv_channels == GLOBAL_HD:  # K=V layers: value is the raw K projection
            value = text.rms_norm(value, self.k_layernorm.eps, self.k_layernorm.weight)  # BUG: V after k_norm
        value = text.rms_norm(value, self.config.layernorm_epsilon)
        query = rope.apply_rotary(query, rotary_pos_emb)
        key = rope.apply_rotary(key, rotary_pos_emb)
        context = self.core_attention(query, key, value, attention_mask)
        return self.linear_proj(context)

    monkeypatch.setattr(text.Gemma4SelfAttention, "forward", forward)
    r = _run()
    assert_localised(r, f"model.layers.{FULL_LAYERS[0]}.self_attn")


# ---------------------------------------------------------------------------------------------------
# 9. Embedding scale not rounded to the weight dtype (bf16)

def test_bf16_embedding_scale_not_rounded(monkeypatch):
    from parity.models import text

    def forward(self, input_ids, position_ids=None, **_):
        emb = self.word_embeddings(input_ids)
        return emb * torch.tensor(self.embed_scale, dtype=torch.float32)  # BUG: fp32 sqrt(H), not rounded to bf16

    monkeypatch.setattr(text.Gemma4Embedding, "forward", forward)
    r = _run("gemma4-text-tiny-bf16")
    detail = assert_localised(r, "model.embed_tokens")
    assert detail["metric"] == "max_abs" and detail["gate"] == 0.0 and detail["value"] > 0


# ---------------------------------------------------------------------------------------------------
# 10. A second system under test plugs in by name (the interface Megatron-Bridge's adapter is written against)

class _OtherSystem:
    """System ``parity`` seen as another system: one pre-norm it cannot hook, the embedding run from HF's code."""

    def __new__(cls):
        from parity import systems
        from parity.systems.ours import ParitySystem

        class Other(ParitySystem):
            name, version = "other", "0.0"
            substituted = [{"part": "TEDotProductAttention", "by": "SDPA", "reason": "no TE on CPU"}]
            shared = frozenset({"embed_tokens"})

            def build(self, *a, **kw):
                super().build(*a, **kw)
                self.names = {**self.names, "layers.{i}.pre_feedforward_layernorm": systems.Elsewhere(
                    "layers.{i}.mlp", "applied as a function of its weight")}
        return Other()


def test_second_system_plugs_in_through_the_registry(monkeypatch):
    from parity import systems

    monkeypatch.setitem(systems.SYSTEMS, "other", f"{__name__}:_OtherSystem")
    r = run(load_case("gemma4-text-tiny"), device="cpu", system="other")
    assert r["passed"] is True, _explain(r)
    assert r["system"] == {"name": "other", "version": "0.0", "substituted": [
        {"part": "TEDotProductAttention", "by": "SDPA", "reason": "no TE on CPU"}]}
    unseen = [m for m in r["modules"] if m["name"] == "model.layers.3.pre_feedforward_layernorm"]
    assert sorted(m["mode"] for m in unseen) == ["end_to_end", "isolated"]
    for m in unseen:
        assert m["megatron_name"] is None and m["rel_l2"] is None and m["compared_at"] == "model.layers.3.mlp", m
        assert m["detail"] == "applied as a function of its weight: compared at model.layers.3.mlp"
    assert {m["name"] for m in r["modules"] if m.get("shared")} == {"model.embed_tokens"}
    # 2 x 6 rows reported instead of compared: the same count as system parity (beside its probing rows)
    assert len([m for m in r["modules"] if m["mode"] != "probing"]) == 260
    with pytest.raises(UserError, match="unknown system under test 'nope'"):
        run(load_case("gemma4-text-tiny"), device="cpu", system="nope")


def test_device_copy_copies_each_tensor_not_the_storage_it_views():
    """``device_copy``: what a sequential run's parked HF model is copied to the device with. Each parameter and buffer
    is copied alone (a plain deepcopy of a view copies the whole storage it views: at full size, every staged
    weight), never shared with the original (even on the same device: peft's merge then changes only the copy),
    ties kept."""
    from parity.tensors import device_copy

    chunk = torch.arange(1000, dtype=torch.float32)  # one staged chunk, viewed by every weight
    model = torch.nn.Sequential(torch.nn.Embedding(4, 4), torch.nn.Linear(4, 4))
    model[0].weight.data = chunk[:16].view(4, 4)
    model[1].weight = model[0].weight  # tied
    model[1].bias.data = chunk[16:20]
    model.register_buffer("scale", chunk[20:21])
    copied = device_copy(model, "cpu")
    assert copied[1].weight is copied[0].weight and isinstance(copied[0].weight, torch.nn.Parameter)
    for name, t in [*copied.named_parameters(), *copied.named_buffers()]:
        original = dict([*model.named_parameters(), *model.named_buffers()])[name]
        assert torch.equal(t, original) and t.untyped_storage().nbytes() == t.numel() * 4
        assert t.untyped_storage().data_ptr() != chunk.untyped_storage().data_ptr()
    with torch.no_grad():
        copied[0].weight.add_(1)
    assert torch.equal(model[0].weight, chunk[:16].view(4, 4)) and chunk[0] == 0
