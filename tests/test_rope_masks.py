"""Laws of the Megatron side's RoPE tables and masks (hypothesis), and agreement with HF's definitions.

The Megatron model computes these from its own args; the tests (not the model) consult HF to check them.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.config import LayerArgs
from parity.models import masks, rope

SETTINGS = settings(max_examples=40, deadline=None)


def _layer(hd: int, rope_type: str, p: float, theta: float) -> LayerArgs:
    return LayerArgs(layer_type="full_attention" if rope_type == "proportional" else "sliding_attention",
                     head_dim=hd, num_kv_heads=1, k_eq_v=False, rope_type=rope_type, rope_theta=theta,
                     partial_rotary_factor=p)


layers = st.builds(
    _layer,
    hd=st.sampled_from([8, 16, 32, 64]),
    rope_type=st.sampled_from(["default", "proportional"]),
    p=st.sampled_from([0.25, 0.5, 1.0]),
    theta=st.sampled_from([1e4, 1e6]),
)


@SETTINGS
@given(layer=layers, pos=st.integers(0, 5000), seed=st.integers(0, 2**16))
def test_rope_rotates_lane_pairs_i_and_i_plus_half(layer, pos, seed):
    """Each pair (i, i + hd/2) is rotated by pos * inv_freq_i; nothing else moves (HF's pairing)."""
    hd = layer.head_dim
    x = torch.randn(1, 1, 1, hd, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    freqs = rope.rotary_freqs(layer, torch.tensor([[pos]]))  # [s, b, 1, hd]
    y = rope.apply_rotary(x, freqs.double())
    half = hd // 2
    assert torch.equal(freqs[..., :half], freqs[..., half:])  # cat(freqs, freqs)
    assert torch.equal(freqs[0, 0, 0, :half], (torch.tensor(float(pos)) * rope.inv_freq(layer)))  # fp32, as HF
    for i in range(half):
        a = freqs[0, 0, 0, i].item()
        c, s = math.cos(a), math.sin(a)
        x1, x2 = x[..., i].item(), x[..., i + half].item()
        assert abs(y[..., i].item() - (x1 * c - x2 * s)) < 1e-9
        assert abs(y[..., i + half].item() - (x2 * c + x1 * s)) < 1e-9


@SETTINGS
@given(layer=layers)
def test_proportional_keeps_full_head_dim_denominator_and_zero_tail(layer):
    hd = layer.head_dim
    inv = rope.inv_freq(layer)
    n_rot = hd // 2 if layer.rope_type == "default" else int(layer.partial_rotary_factor * hd // 2)
    assert inv.shape == (hd // 2,)
    expected = [layer.rope_theta ** (-(2 * i) / hd) for i in range(n_rot)]
    assert torch.allclose(inv[:n_rot].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    assert torch.all(inv[n_rot:] == 0)


@SETTINGS
@given(layer=layers, m=st.integers(0, 300), n=st.integers(0, 300), shift=st.integers(0, 300),
       seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(layer, m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, layer.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, layer.head_dim, generator=g, dtype=torch.float64)

    def score(a, b):
        fa = rope.rotary_freqs(layer, torch.tensor([[a]])).double()
        fb = rope.rotary_freqs(layer, torch.tensor([[b]])).double()
        return (rope.apply_rotary(q, fa) * rope.apply_rotary(k, fb)).sum().item()

    # Angles are fp32 (HF's semantics): each is off by at most one fp32 rounding of pos * inv_freq (<= 2^-24 *
    # pos relative, inv_freq <= 1), which moves the score by at most |q| |k| times the angle errors.
    angle_err = 2 * (max(m, n) + shift + 1) * 2.0**-24
    bound = 4 * q.norm().item() * k.norm().item() * angle_err + 1e-12
    assert abs(score(m, n) - score(m + shift, n + shift)) <= bound


def test_inv_freq_matches_hf_for_the_26b_layers():
    """Our tables equal HF's rope init functions bit for bit (sliding default, full proportional)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    from parity.config import TextArgs, full_text_config_kwargs, make_text_config

    cfg = make_text_config(full_text_config_kwargs())
    args = TextArgs.from_hf(cfg)
    for layer_type, i in (("sliding_attention", 0), ("full_attention", 5)):
        rp = cfg.rope_parameters[layer_type]
        fn = (Gemma4TextRotaryEmbedding.compute_default_rope_parameters if rp["rope_type"] == "default"
              else ROPE_INIT_FUNCTIONS[rp["rope_type"]])
        hf_inv, _ = fn(cfg.per_layer_config[layer_type], None, layer_type=layer_type)
        assert torch.equal(rope.inv_freq(args.layers[i]), hf_inv)


# ----------------------------------------------------------------------------------------------- masks

@SETTINGS
@given(s=st.integers(1, 24), w=st.integers(1, 12), pad=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_masks_equal_their_definitions(s, w, pad, seed):
    pad = min(pad, s - 1)
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(0, 2, (2, s), generator=g)  # 0 text, 1 image
    padding = torch.ones(2, s, dtype=torch.long)
    if pad:
        padding[1, s - pad:] = 0
    got = masks.build_masks(s, batch=2, sliding_window=w, padding_mask=padding, mm_token_type_ids=types,
                            bidirectional="vision")
    blocks = masks.vision_block_ids(types)
    for b in range(2):
        for q in range(s):
            if not padding[b, q]:
                continue  # padded queries are never compared
            for k in range(s):
                key_ok = bool(padding[b, k])
                causal = k <= q
                same_block = blocks[b, q] >= 0 and blocks[b, q] == blocks[b, k]
                assert got["full_attention"][b, 0, q, k].item() == (causal and key_ok)
                sliding = (k > q - w) and (causal or bool(same_block))
                assert got["sliding_attention"][b, 0, q, k].item() == (sliding and key_ok)


@SETTINGS
@given(types=st.lists(st.integers(0, 2), min_size=1, max_size=30))
def test_vision_blocks_are_contiguous_runs(types):
    t = torch.tensor([types])
    ids = masks.vision_block_ids(t)[0].tolist()
    expected, cur, prev_vision = [], -1, False
    for v in types:
        vision = v in (1, 2)
        if vision and not prev_vision:
            cur += 1
        expected.append(cur if vision else -1)
        prev_vision = vision
    assert ids == expected


def test_sliding_mask_matches_hf_without_padding():
    """HF's own sliding-window mask for a text sequence equals ours (window (W-1, 0))."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    s, w = 20, 6
    fn = sliding_window_causal_mask_function(w)
    t = torch.tensor
    hf = torch.tensor([[bool(fn(t(0), t(0), t(q), t(k))) for k in range(s)] for q in range(s)])
    ours = masks.build_mask(s, sliding_window=w)[0, 0]
    assert torch.equal(hf, ours)
