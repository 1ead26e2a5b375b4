"""Gemma 4 VLM parity (``Gemma4ForConditionalGeneration`` vs ``parity.models.vlm.Gemma4VLModel``) on CPU.

- the fp32 tiny VLM case passes with every vision and language module compared in both modes;
- a probe proves the vision-bidirectional mask reaches attention on both sides: perturbing the merged
  embeddings at a *later* image position changes an *earlier* position of the same image in the first
  (sliding) layer identically in HF and Megatron, and leaves earlier text positions exactly unchanged;
- removing the bidirectional rule on either side is caught and localised to the first sliding self_attn;
- a tiny VLM folder (text + vision) survives HF -> Megatron -> HF bit for bit.
"""
from __future__ import annotations

import pytest
import torch

from parity.cases import load_case
from parity.engine.alignment import TABLE_KINDS, Kind, Stack, expand
from parity.engine.kinds import GROUPS, KINDS
from parity.engine.pipeline import run
from parity.systems.ours import ParitySystem

CASE = "gemma4-vlm-tiny"
FIRST_SLIDING_ATTN = "model.language_model.layers.0.self_attn"
MERGED = "merged_embeddings"
TEXT_HF = KINDS["vlm"].prefixes[Stack.TEXT]


def run_vlm(case: str = CASE, **sections) -> dict:
    c = load_case(case)
    return run(c.replace(**sections) if sections else c, device="cpu")


def _explain(r: dict) -> str:
    bad = sorted((m for m in r["modules"] if not m["passed"]), key=lambda m: (m["order"], m["mode"] != "isolated"))
    rows = [f"{m['name']} [{m['mode']}] {m['gate']['metric']}={m.get(m['gate']['metric'])} gate={m['gate']['max']}"
            for m in bad[:8]]
    return f"first_divergence={r['summary']['first_divergence']!r}:\n  " + "\n  ".join(rows)


@pytest.fixture(scope="module")
def clean() -> dict:
    return run_vlm()


def _system(config, state) -> ParitySystem:
    """System ``parity`` built from the HF config, its weights loaded through the bridges."""
    sut = ParitySystem()
    sut.build("vlm", config, dtype=torch.float32, device="cpu")
    sut.load(state)
    return sut


@pytest.fixture(scope="module")
def built():
    """HF VLM, Megatron VLM (weights through the bridges) and the case's raw inputs, fp32."""
    from parity import megatron_env

    case = load_case(CASE)
    megatron_env.init(seed=case.seed)
    hf, config = KINDS["vlm"].build(case, torch.float32, "cpu", None, case.seed)
    mc = _system(config, hf.state_dict()).model
    return dict(hf=hf, mc=mc, config=config, inputs=KINDS["vlm"].inputs(config, case, case.seed, "cpu"))


# ---------------------------------------------------------------------------------------------------

def test_fp32_passes_with_every_module_in_both_modes(clean, built):
    r = clean
    assert r["passed"] is True, _explain(r)
    assert r["summary"]["first_divergence"] is None and all(r["checks"].values()), r["checks"]
    mc, config = built["mc"], built["config"]
    rows = [a for a in expand(KINDS["vlm"].prefixes, mc.text_args, mc.vision_args.num_layers)
            if a.row.kind not in TABLE_KINDS]
    vision = {a.hf for a in rows if a.group() == "vision"}
    text = {a.hf for a in rows if a.group() == "text" and a.row.kind is not Kind.MERGED}
    assert "model.vision_tower.encoder.layers.1.self_attn.q_proj.linear" in vision
    assert {"model.language_model.embed_tokens", "model.language_model.layers.5.experts", "lm_head", "logits"} <= text
    for mode in ("end_to_end", "isolated"):
        seen = {m["name"] for m in r["modules"] if m["mode"] == mode}
        assert vision | text | {MERGED} <= seen, (mode, sorted((vision | text | {MERGED}) - seen))
    # every HF vision module that runs a forward is compared (a ModuleList has none)
    hf_vision = {n for n, m in built["hf"].named_modules()
                 if n.startswith(("model.vision_tower", "model.embed_vision")) and not isinstance(m, torch.nn.ModuleList)}
    assert hf_vision == vision
    for m in r["modules"]:
        assert m["passed"], m
        assert m["group"] == ("vision" if m["name"].startswith(("model.vision_tower", "model.embed_vision")) else "text")
        if m["kind"] != "mask":
            assert m["rel_l2"] <= 1e-5, m
    tables = {(m["megatron_name"], m["name"]) for m in r["modules"] if m["kind"] in ("mask", "rope")}
    assert {("masks[sliding_attention]", FIRST_SLIDING_ATTN), ("masks[full_attention]", "model.language_model.layers.2.self_attn"),
            ("vision.masks[encoder]", "model.vision_tower.encoder.layers.0.self_attn")} <= tables
    assert r["summary"]["logits"]["rel_l2"] <= 1e-5 and r["summary"]["logits"]["kl_max"] <= 1e-6
    assert r["roundtrip"]["tensors"] == len(built["hf"].state_dict()) - 1  # tied lm_head not exported twice
    assert r["roundtrip"]["bit_exact"] == r["roundtrip"]["tensors"]
    # the case's shape: >= 2 images of different sizes, a sequence longer than the sliding window
    assert r["inputs"]["num_images"] >= 2 and len(set(r["inputs"]["soft_tokens_per_image"])) >= 2
    assert r["inputs"]["seq_len"] > r["inputs"]["sliding_window"]
    assert config.text_config.use_bidirectional_attention == "vision"


def test_every_row_of_the_table_has_its_module_in_system_parity(built, clean):
    """The table and system parity's names agree: every row of the VLM (vision, merged, text) names a module of
    the built model, and every mask / RoPE row one of its own tables; no row is left unobserved."""
    sut = _system(built["config"], built["hf"].state_dict())
    sut.prepare(built["inputs"])
    rows, tables = expand(KINDS["vlm"].prefixes, sut.args, sut.model.vision_args.num_layers), sut.tables()
    n_tables = sum(a.row.kind in TABLE_KINDS for a in rows)
    compared = [m for m in clean["modules"] if m["mode"] != "probing"]  # probing rows: tests/test_probing.py
    assert n_tables == 5 and 2 * (len(rows) - n_tables) + n_tables == len(compared)  # both modes + tables
    for a in rows:
        name = sut.names[a.row.name_key].format(**a.slots)
        if a.row.kind in TABLE_KINDS:
            assert name in tables, (a.hf, name)
        elif a.row.kind is not Kind.LOGITS:  # lm_head + softcap: not a module on either side
            assert sut.module(name) is not None, (a.hf, name)
    assert {"masks[sliding_attention]", "masks[full_attention]", "rotary_tables[sliding_attention]",
            "rotary_tables[full_attention]", "vision.masks[encoder]"} == set(tables)


def test_metrics_split_by_position_group(clean):
    g = clean["groups"]
    assert set(g["positions"]) == set(GROUPS) and all(n > 0 for n in g["positions"].values())
    for name in GROUPS:
        assert g["logits"][name]["rel_l2"] <= 1e-5 and g["logits"][name]["top1_agreement"] == 1.0
    layers = {(x["name"], x["mode"]) for x in g["layers"]}
    assert {(f"{TEXT_HF}layers.{i}", mode) for i in range(6) for mode in ("end_to_end", "isolated")} <= layers
    for x in g["layers"]:
        assert all(x[name]["rel_l2"] <= 1e-5 for name in GROUPS), x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_passes_against_its_noise_floor():
    r = run_vlm("gemma4-vlm-tiny-bf16")
    assert r["dtype"] == "bfloat16"
    assert r["passed"] is True, _explain(r)
    floored = [m for m in r["modules"] if m.get("floor") and m["gate"]["metric"] == "rel_l2"]
    assert {m["group"] for m in floored} == {"vision", "text"} and len(floored) > 250
    for m in floored:
        assert m["gate"]["max"] == pytest.approx(min(4.0 * m["floor"] + 1e-3, 0.35)) and m["rel_l2"] <= m["gate"]["max"], m
    by_mode = {(m["name"], m["mode"]): m for m in r["modules"]}
    for name in (MERGED, "model.vision_tower", "model.embed_vision", "logits"):
        assert by_mode[(name, "end_to_end")]["floor"] > 0
    for mode in ("end_to_end", "isolated"):  # deterministic elementwise: bit-exact even in bf16
        assert by_mode[("model.language_model.embed_tokens", mode)]["max_abs"] == 0.0
    logits = r["summary"]["logits"]
    assert logits["kl_max_floor"] > 0 and logits["kl_gate"] == pytest.approx(min(4.0 * logits["kl_max_floor"] + 1e-3, 1.0))
    assert logits["kl_max"] <= logits["kl_gate"]


def _first_image_block(mm: torch.Tensor) -> tuple[int, int]:
    idx = (mm == 1).nonzero().flatten().tolist()
    start = idx[0]
    end = start
    while end + 1 < len(mm) and mm[end + 1] == 1:
        end += 1
    return start, end  # inclusive


def test_mask_probe_later_image_token_reaches_earlier_one_on_both_sides(built):
    """Sliding layers are bidirectional inside an image: a change at a later image position reaches an
    earlier position of the same image in layer 0, identically on both sides; earlier text never moves."""
    hf, mc, inputs = built["hf"], built["mc"], built["inputs"]
    mm = inputs["mm_token_type_ids"][0]
    start, end = _first_image_block(mm)
    assert end - start >= 2 and bool((mm[:start] == 0).all())
    delta = torch.zeros(*inputs["input_ids"].shape, mc.text_args.hidden_size)
    delta[0, end] = torch.randn(mc.text_args.hidden_size, generator=torch.Generator().manual_seed(1))

    def hf_layer0(perturb: bool) -> torch.Tensor:
        seen = {}
        def pre(m, args, kwargs):
            if perturb:
                kwargs = {**kwargs, "inputs_embeds": kwargs["inputs_embeds"] + delta}
            return args, kwargs
        h1 = hf.model.language_model.register_forward_pre_hook(pre, with_kwargs=True)
        h2 = hf.model.language_model.layers[0].register_forward_hook(lambda m, a, o: seen.update(out=o))
        try:
            with torch.no_grad():
                hf(**inputs, use_cache=False)
        finally:
            h1.remove(), h2.remove()
        return seen["out"]

    def mc_layer0(perturb: bool) -> torch.Tensor:
        seen = {}
        h1 = mc.image_scatter.register_forward_hook(lambda m, a, o: o + delta if perturb else None)
        h2 = mc.language_model.decoder.layers[0].register_forward_hook(lambda m, a, o: seen.update(out=o))
        keys = ("input_ids", "pixel_values", "image_position_ids", "attention_mask", "position_ids", "mm_token_type_ids")
        try:
            with torch.no_grad():
                mc(**{k: inputs[k] for k in keys})
        finally:
            h1.remove(), h2.remove()
        return seen["out"].transpose(0, 1)

    base_hf, base_mc = hf_layer0(False), mc_layer0(False)
    d_hf, d_mc = hf_layer0(True) - base_hf, mc_layer0(True) - base_mc
    valid = inputs["attention_mask"].bool()
    # earlier text (and the other sequence): exactly unchanged on both sides
    for d in (d_hf, d_mc):
        assert torch.count_nonzero(d[0, :start]) == 0
        assert torch.count_nonzero(d[1][valid[1]]) == 0
    # earlier positions of the same image move (only the bidirectional rule lets them see the later one) ...
    earlier = slice(start, end)
    moved = d_hf[0, earlier].norm(dim=-1)
    p = start + int(moved.argmax())
    assert moved.max() > 0.1 and bool((moved > 0).all())
    # ... by the same amount on both sides: what differs is round-off, like the unperturbed outputs' difference
    assert rel(d_mc[0, p], d_hf[0, p]) <= 1e-4 and rel(d_mc[0, earlier], d_hf[0, earlier]) <= 1e-4
    roundoff = (base_mc - base_hf)[valid].abs().max()
    assert (d_mc - d_hf)[valid].abs().max() <= 2 * roundoff and d_hf[0, p].abs().max() > 1e3 * roundoff


def _no_bidirectional_megatron(monkeypatch):
    from parity.models import masks

    orig = masks.build_masks
    monkeypatch.setattr(masks, "build_masks", lambda seq_len, **kw: orig(seq_len, **{**kw, "bidirectional": None}))


def _no_bidirectional_hf(monkeypatch):
    from transformers.models.gemma4 import modeling_gemma4 as mg

    def plain(block_sequence_ids=None, **kw):  # what HF does without mm_token_type_ids: plain causal masks
        return {"full_attention": mg.create_causal_mask(**kw), "sliding_attention": mg.create_sliding_window_causal_mask(**kw)}
    monkeypatch.setattr(mg, "create_masks_for_vision_model", plain)


@pytest.mark.parametrize("side", ["megatron", "hf"])
def test_missing_bidirectional_mask_is_localised(monkeypatch, side):
    (_no_bidirectional_megatron if side == "megatron" else _no_bidirectional_hf)(monkeypatch)
    r = run_vlm(run={"sequential": True})
    assert r["passed"] is False and r["checks"]["modules"] is False, _explain(r)
    assert r["summary"]["first_divergence"] == FIRST_SLIDING_ATTN, _explain(r)
    failing = {(m["name"], m["mode"], m["kind"]) for m in r["modules"] if not m["passed"]}
    assert (FIRST_SLIDING_ATTN, "end_to_end", "mask") in failing  # the mask row itself
    assert (FIRST_SLIDING_ATTN, "isolated", "attention") in failing  # and the attention it feeds
    assert not any(n.startswith(("model.vision_tower", "model.embed_vision")) or n == MERGED for n, _, _ in failing)
    assert r["hf_released_before_megatron"] is True


def _image_features_scaled(monkeypatch):
    """The classic VLM bug: image features scaled by sqrt(H) like text embeddings."""
    from parity.models.vlm import ImageScatter

    orig = ImageScatter.forward
    monkeypatch.setattr(ImageScatter, "forward",
                        lambda self, emb, feats, mask: orig(self, emb, feats * emb.shape[-1] ** 0.5, mask))


def _no_std_scale(monkeypatch):
    from parity.models import vision

    monkeypatch.setattr(vision.VisionModel, "standardize", lambda self, h: h - self.std_bias.float())


@pytest.mark.parametrize("bug, name", [(_image_features_scaled, MERGED), (_no_std_scale, "model.vision_tower")],
                         ids=["image_features_scaled", "no_std_scale"])
def test_planted_vlm_bug_is_localised(monkeypatch, bug, name):
    """Inline steps name their nearest module: the scatter -> merged_embeddings, standardisation -> vision_tower."""
    bug(monkeypatch)
    r = run_vlm()
    assert r["passed"] is False and r["summary"]["first_divergence"] == name, _explain(r)
    first = min(m["order"] for m in r["modules"] if m["name"] == name and not m["passed"])
    assert all(m["passed"] for m in r["modules"] if m["order"] < first)  # everything upstream still matches


def test_tiny_vlm_folder_round_trip_is_bit_exact(built, tmp_path):
    from parity.bridge import io as bio
    from parity.bridge.convert import same_bits

    hf = built["hf"]
    original = hf.state_dict()
    bio.save_folder(original, built["config"], tmp_path)
    config, loaded = bio.load_folder(tmp_path)
    assert type(config).__name__ == "Gemma4Config"
    back = dict(_system(config, loaded).export())
    expected = {k for k in original if k != "lm_head.weight"}  # tied: not written, not exported
    assert set(loaded) == expected and set(back) == expected
    vision_keys = [k for k in expected if k.startswith(("model.vision_tower.", "model.embed_vision."))]
    assert len(vision_keys) > 50 and any(k.endswith("std_scale") for k in vision_keys)
    for k in expected:
        assert same_bits(back[k], loaded[k]), k
        assert same_bits(loaded[k], original[k].contiguous()), k


def test_the_fp32_floor_streams_one_text_layer_at_a_time(built):
    """At the 26B-A4B shape a whole fp32 copy of the VLM (100 GB beside the bf16 model) ran out of memory in the
    floor phase. HF's own forward now runs on an fp32 copy of everything but the text decoder layers, each layer a
    stand-in that copies just that layer: the copied shell holds no layer weights, every layer is copied alone and
    in order, and the logits are bit-identical to a whole fp32 copy's."""
    import copy

    hf, inputs = built["hf"], built["inputs"]
    bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    copied: list[tuple[str, int]] = []

    def run_copy(module, name, *args, **kwargs):
        copied.append((name, sum(p.numel() for p in module.parameters())))
        with torch.no_grad():
            return copy.deepcopy(module).float()(*args, **kwargs)

    logits = KINDS["vlm"].forward_fp32(bf16, inputs, None, run_copy, prog=type("P", (), {"note": print})())
    layers = bf16.model.language_model.layers
    assert isinstance(layers, torch.nn.ModuleList) and type(layers[0]).__name__ == "Gemma4TextDecoderLayer"  # put back
    per_layer = sum(p.numel() for p in layers.parameters())
    total = sum(p.numel() for p in bf16.parameters())
    assert copied[0] == ("", total - per_layer)  # the shell: everything but the layers
    assert [n for n, _ in copied[1:]] == [f"{TEXT_HF}layers.{i}" for i in range(len(layers))]
    assert [k for _, k in copied[1:]] == [sum(p.numel() for p in la.parameters()) for la in layers]
    with torch.no_grad():
        whole = copy.deepcopy(bf16).float()(**inputs, use_cache=False).logits
    assert torch.equal(logits, whole.float())
