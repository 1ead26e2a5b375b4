"""Megatron Gemma 4 vision tower vs HF, module by module, in fp32 on CPU (fast)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity import megatron_env
from parity.bridge.vision import gather_vision, hf_to_megatron_vision, megatron_to_hf_vision, shard_vision
from parity.engine.alignment import VISION
from parity.engine.randomize import randomize_
from parity.engine.vlm_inputs import (aspect_ratio_preserving_size, build_vlm_inputs, patch_positions, patchify,
                                      process_images)
from parity.vlm_config import VisionArgs, make_vlm_config

GATE = 1e-5  # fp32 vs fp32 rel-L2: round-off only
PREFIX = "model."


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tensors(out) -> list[torch.Tensor]:
    if hasattr(out, "last_hidden_state"):
        return [out.last_hidden_state]
    if isinstance(out, tuple):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return [out]


def _rows(num_layers: int) -> list[tuple[str, str, str]]:
    """(HF path, path in ``Gemma4VisionTowerMC``, layout) of every vision row of the alignment table, with the
    module names of system ``parity`` (whose VLM holds the tower as ``vision.``)."""
    from parity.systems.ours import VISION as NAMES

    return [(PREFIX + r.hf.format(i=i), NAMES[r.name_key].format(i=i).removeprefix("vision."),
             r.kind.value.removeprefix("vision_")) for r in VISION for i in (range(num_layers) if "{i}" in r.hf else [None])]


def _twins(mc, num_layers: int) -> dict[str, torch.nn.Module]:
    return {hf: mc.get_submodule(name) for hf, name, _ in _rows(num_layers)}


def _capture(named: dict[str, torch.nn.Module], run) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def fn(module, args, out):
            assert name not in seen, f"{name} called twice"
            seen[name] = [t.detach().clone() for t in _tensors(out)]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in named.items()]
    try:
        with torch.no_grad():
            final = run()
    finally:
        for h in handles:
            h.remove()
    seen["<final>"] = [final]
    return seen


@pytest.fixture(scope="module")
def setup():
    from transformers import Gemma4ForConditionalGeneration

    from parity.models.vision import Gemma4VisionTowerMC

    megatron_env.init()
    torch.manual_seed(0)
    config = make_vlm_config()
    hf = randomize_(Gemma4ForConditionalGeneration(config).eval(), seed=0)
    args = VisionArgs.from_hf(config)
    mc = Gemma4VisionTowerMC(args).eval()
    mc.load_state_dict(hf_to_megatron_vision(hf.state_dict(), PREFIX), strict=True)
    inputs = build_vlm_inputs(config, seed=0)
    return dict(config=config, hf=hf, mc=mc, args=args, inputs=inputs)


def _hf_features(hf, inputs):
    out = hf.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
    return torch.cat(out.pooler_output)


def _compare(setup) -> dict[str, float]:
    """rel-L2 per HF module (at real patches / real soft tokens only, per the layout in MODULES) and for
    the final features."""
    hf, mc, inputs = setup["hf"], setup["mc"], setup["inputs"]
    twins = _twins(mc, setup["args"].num_layers)
    hf_named = dict(hf.named_modules())
    hf_out = _capture({n: hf_named[n] for n in twins}, lambda: _hf_features(hf, inputs))
    mc_out = _capture(twins, lambda: mc(inputs["pixel_values"], inputs["image_position_ids"]))
    real = (inputs["image_position_ids"] != -1).all(-1)  # [I, N]
    pooler = PREFIX + "vision_tower.pooler"
    slots = hf_out[pooler][1]  # [I, N/k^2], HF's own valid-slot mask
    assert torch.equal(mc_out[pooler][1], slots)
    layouts = {hf_name: layout for hf_name, _, layout in _rows(setup["args"].num_layers)}
    layouts["<final>"] = "tokens"
    rows = {"patches": real, "rope": real, "pooled": slots, "tokens": None}
    result = {}
    for name in hf_out:
        keep = rows[layouts[name]]
        pairs = list(zip(mc_out[name], hf_out[name]))[: 1 if layouts[name] == "pooled" else None]
        assert len(mc_out[name]) == len(hf_out[name]), name
        worst = 0.0
        for a, b in pairs:
            assert a.shape == b.shape, (name, a.shape, b.shape)
            if keep is not None:
                a, b = a[keep], b[keep]
            worst = max(worst, rel_l2(a, b))
        result[name] = worst
    return result


def test_every_hf_vision_module_has_a_twin(setup):
    twins = _twins(setup["mc"], setup["args"].num_layers)
    hf_vision = {n: m for n, m in setup["hf"].named_modules()
                 if n.startswith((PREFIX + "vision_tower", PREFIX + "embed_vision"))}
    # every HF vision module that runs a forward has a twin (a ModuleList has no forward)
    assert [n for n, m in hf_vision.items() if n not in twins and not isinstance(m, torch.nn.ModuleList)] == []
    assert set(twins) <= set(hf_vision)
    assert len({id(m) for m in twins.values()}) == len(twins)  # one twin per HF module


def test_vision_modules_match_hf(setup):
    result = _compare(setup)
    assert len(result) == len(_twins(setup["mc"], setup["args"].num_layers)) + 1
    bad = {n: r for n, r in result.items() if not r <= GATE}
    assert not bad, bad
    assert result["<final>"] <= GATE


def test_padding_rows_also_match(setup):
    """HF computes padded patches too (they attend to real ones, RoPE at -1); the twin does the same."""
    hf, mc, inputs = setup["hf"], setup["mc"], setup["inputs"]
    name = PREFIX + "vision_tower.encoder"
    hf_out = _capture({name: dict(hf.named_modules())[name]}, lambda: _hf_features(hf, inputs))
    mc_out = _capture({name: mc.vision_model.encoder}, lambda: mc(inputs["pixel_values"], inputs["image_position_ids"]))
    assert rel_l2(mc_out[name][0], hf_out[name][0]) <= GATE


def test_clip_bounds_are_finite_and_really_clip(setup):
    hf = setup["hf"]
    clippables = {n: m for n, m in hf.named_modules() if type(m).__name__ == "Gemma4ClippableLinear"}
    assert clippables
    counts = {"input": 0, "output": 0}

    def pre(module, args):
        x = args[0]
        assert torch.isfinite(module.input_min) and torch.isfinite(module.input_max)
        counts["input"] += int(((x < module.input_min) | (x > module.input_max)).sum())

    def post_linear(owner):
        def fn(module, args, y):
            counts["output"] += int(((y < owner.output_min) | (y > owner.output_max)).sum())
        return fn

    handles = [m.register_forward_pre_hook(pre) for m in clippables.values()]
    handles += [m.linear.register_forward_hook(post_linear(m)) for m in clippables.values()]
    try:
        with torch.no_grad():
            _hf_features(hf, setup["inputs"])
    finally:
        for h in handles:
            h.remove()
    assert counts["input"] > 0 and counts["output"] > 0, counts


def test_roundtrip_bit_exact(setup):
    hf_state = {k: v for k, v in setup["hf"].state_dict().items()
                if k.startswith((PREFIX + "vision_tower.", PREFIX + "embed_vision."))}
    back = megatron_to_hf_vision(setup["mc"].state_dict(), PREFIX)
    assert set(back) == set(hf_state)
    for key, ref in hf_state.items():
        got = back[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)), key
    buffers = [k for k in hf_state if k.endswith(("_min", "_max", "std_bias", "std_scale", "embedding_table"))]
    assert len(buffers) == 4 * 7 * setup["args"].num_layers + 3


def test_tp_shards_gather_back():
    from parity.models.vision import Gemma4VisionTowerMC

    megatron_env.init()
    args = VisionArgs.from_hf(make_vlm_config())
    full = {k: v for k, v in Gemma4VisionTowerMC(args).state_dict().items() if v is not None}
    shards = [shard_vision(full, r, 2) for r in range(2)]
    assert shards[0]["vision_model.encoder.layers.0.self_attention.linear_q.linear.weight"].shape[0] == 24
    assert shards[0]["vision_model.encoder.layers.0.self_attention.linear_proj.linear.weight"].shape[1] == 24
    again = gather_vision(shards)
    assert all(torch.equal(again[k], full[k]) for k in full)


def test_soft_tokens_match_image_tokens(setup):
    config, inputs, mc = setup["config"], setup["inputs"], setup["mc"]
    per_image = mc.soft_tokens_per_image(inputs["image_position_ids"])
    assert len(per_image) == 3 and len(set(per_image)) == 3  # three images of different sizes
    runs = []
    for row in inputs["input_ids"].tolist():
        starts = [j for j, t in enumerate(row) if t == config.boi_token_id]
        ends = [j for j, t in enumerate(row) if t == config.eoi_token_id]
        for s, e in zip(starts, ends):
            assert all(t == config.image_token_id for t in row[s + 1 : e])
            runs.append(e - s - 1)
    assert runs == per_image
    assert (inputs["input_ids"] == config.image_token_id).sum(1).tolist() == [sum(per_image[:2]), per_image[2]]
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == config.image_token_id).long())
    with torch.no_grad():
        features = mc(inputs["pixel_values"], inputs["image_position_ids"])
    assert features.shape == (sum(per_image), config.text_config.hidden_size)
    # shape of the batch: 2 sequences, right padding, longer than the sliding window
    lengths = inputs["attention_mask"].sum(1)
    assert lengths[0] > lengths[1] and inputs["input_ids"].shape[1] > config.text_config.sliding_window
    assert (inputs["input_ids"][inputs["attention_mask"] == 0] == config.text_config.pad_token_id).all()


def test_hf_accepts_the_inputs(setup):
    """HF's own check: the number of image tokens equals the number of soft tokens its tower returns."""
    with torch.no_grad():
        out = setup["hf"](**setup["inputs"])
    assert torch.isfinite(out.logits).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3))
def test_patch_layout(ph, pw, p):
    """pixel_values[n] is the (py, px, c)-ordered patch at image_position_ids[n] = (x, y)."""
    image = torch.randint(0, 256, (3, ph * p, pw * p), dtype=torch.uint8)
    patches, pos = patchify(image, p), patch_positions(ph, pw)
    for n, (x, y) in enumerate(pos.tolist()):
        block = image[:, y * p : (y + 1) * p, x * p : (x + 1) * p].permute(1, 2, 0)  # (py, px, c)
        assert torch.equal(patches[n], block.reshape(-1))
    out = process_images([image], patch_size=p, pooling_kernel_size=1, max_soft_tokens=ph * pw + 2)
    assert (out["image_position_ids"][0, ph * pw :] == -1).all() and (out["pixel_values"][0, ph * pw :] == 0).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(8, 400), st.integers(8, 400), st.sampled_from([70, 140, 280]))
def test_resize_arithmetic_matches_hf(h, w, max_soft):
    from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

    kw = dict(patch_size=4, max_patches=max_soft * 4, pooling_kernel_size=2)
    try:
        ref = get_aspect_ratio_preserving_size(height=h, width=w, **kw)
    except ValueError:
        with pytest.raises(ValueError):
            aspect_ratio_preserving_size(h, w, **kw)
        return
    assert aspect_ratio_preserving_size(h, w, **kw) == ref


# ---- planted bugs: the comparison must see each of them --------------------------------------------

BUGS = ["rope_xy_swapped", "no_std_scale", "text_eps_in_vision_norms", "pool_rows_cols", "padding_keys_visible"]


@pytest.mark.parametrize("bug", BUGS)
def test_planted_bug_is_detected(setup, monkeypatch, bug):
    from parity.models import vision

    mc = setup["mc"]
    if bug == "rope_xy_swapped":
        orig = vision.axial_angles
        monkeypatch.setattr(vision, "axial_angles", lambda pos, inv: orig(pos.flip(-1), inv))
    elif bug == "no_std_scale":
        monkeypatch.setattr(vision.VisionModel, "standardize", lambda self, h: h - self.std_bias.float())
    elif bug == "text_eps_in_vision_norms":
        for m in mc.vision_model.modules():
            if isinstance(m, vision.Gemma4RMSNorm):
                monkeypatch.setattr(m, "eps", setup["config"].text_config.rms_norm_eps)
    elif bug == "pool_rows_cols":
        orig_forward = vision.VisionPooler.forward
        monkeypatch.setattr(vision.VisionPooler, "forward",
                            lambda self, h, pos, pad: orig_forward(self, h, pos.flip(-1), pad))
    elif bug == "padding_keys_visible":
        orig_attend = vision.VisionCoreAttention.forward
        monkeypatch.setattr(vision.VisionCoreAttention, "forward",
                            lambda self, q, k, v, mask: orig_attend(self, q, k, v, torch.ones_like(mask)))
    result = _compare(setup)
    assert result["<final>"] > 100 * GATE, result["<final>"]


def test_tp_split_table_matches_the_towers_parallel_linears(setup):
    """``parity.systems.ours._VISION_TP`` (how each vision-layer row's module splits over TP) is data; here it is held
    against the tower itself: every row whose module is (or wraps) a column-parallel linear that keeps its output split
    reads "output", every row-parallel one "input", the per-head norms "heads"; no other row is listed, and every
    listed suffix is a row of the alignment table."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from parity.systems.ours import _L, _VISION_TP

    rows = {r.hf: r for r in VISION}
    mc, seen = setup["mc"], {}
    for hf, name, _ in _rows(setup["args"].num_layers):
        if ".layers.0." not in hf:
            continue
        module = mc.get_submodule(name)
        linear = getattr(module, "linear", module)
        suffix = hf.removeprefix(PREFIX + _L.format(i=0))
        if isinstance(linear, ColumnParallelLinear) and not linear.gather_output:
            seen[suffix] = "output"
        elif isinstance(linear, RowParallelLinear):
            seen[suffix] = "input"
        elif suffix.startswith(".self_attn.") and suffix.endswith("_norm"):
            seen[suffix] = "heads"
    expected = {k: v for k, v in _VISION_TP.items() if v != "features"}
    assert seen == expected
    assert all(_L + suffix in rows for suffix in _VISION_TP)
    assert set(_VISION_TP.values()) == {"output", "input", "heads", "features"}
