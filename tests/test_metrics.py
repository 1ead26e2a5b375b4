"""Known-answer and property tests for parity/engine/metrics.py."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.engine.metrics import (
    bf16_step,
    is_bit_exact,
    logits_metrics,
    noise_floor_ratio,
    router_metrics,
    tensor_digest,
    tensor_metrics,
)

FAST = settings(max_examples=40, deadline=None)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ tensors


def test_identical_tensors():
    x = _randn(2, 5, 48)
    m = tensor_metrics(x, x.clone())
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert m["rel_l2"] == 0.0 and m["max_abs"] == 0.0 and m["p99_abs"] == 0.0 and m["mean_abs"] == 0.0
    assert m["numel"] == 2 * 5 * 48 and m["nonfinite_ref"] == 0 and m["nonfinite_test"] == 0


def test_uniform_scale_error_is_invisible_to_cosine_but_not_rel_l2():
    x = _randn(4, 96, dtype=torch.float64)
    m = tensor_metrics(x, 1.02 * x)
    assert abs(m["cosine"] - 1.0) <= 1e-12
    assert m["rel_l2"] == pytest.approx(0.02, abs=1e-12)
    assert m["max_abs"] == pytest.approx(0.02 * x.abs().max().item(), rel=1e-12)


def test_sign_flip():
    x = _randn(3, 7)
    m = tensor_metrics(x, -x)
    assert m["cosine"] == pytest.approx(-1.0, abs=1e-12)
    assert m["rel_l2"] == pytest.approx(2.0, abs=1e-12)


def test_metrics_are_float64_not_input_precision():
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    test = torch.tensor([1.0, 2.0, 3.015625], dtype=torch.bfloat16)  # one bf16 step at 3
    m = tensor_metrics(ref, test)
    assert m["max_abs"] == 0.015625
    assert m["rel_l2"] == pytest.approx(0.015625 / math.sqrt(14), rel=1e-12)


def test_p99_matches_linear_quantile():
    ref = torch.zeros(1000, dtype=torch.float64)
    test = _randn(1000, seed=3, dtype=torch.float64)
    m = tensor_metrics(ref, test)
    assert m["p99_abs"] == pytest.approx(torch.quantile(test.abs(), 0.99).item(), rel=1e-12)
    assert m["rel_l2"] == math.inf  # ||ref|| == 0 but test is not
    ties = torch.randint(0, 4, (1001,), generator=torch.Generator().manual_seed(1)).double()
    m = tensor_metrics(torch.zeros(1001, dtype=torch.float64), ties)
    assert m["p99_abs"] == pytest.approx(torch.quantile(ties, 0.99).item(), rel=1e-12)


def test_both_zero():
    z = torch.zeros(4, 4)
    m = tensor_metrics(z, z)
    assert m["rel_l2"] == 0.0 and m["cosine"] == 1.0


def test_mask_excludes_corrupted_padding():
    ref = _randn(2, 4, 48)
    test = ref.clone()
    test[1, 3] = 1e6  # padding position, garbage
    test[0, 2, 5] = float("nan")  # padding too
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    mask[0, 2] = False
    m = tensor_metrics(ref, test, mask)
    assert m["rel_l2"] == 0.0 and m["max_abs"] == 0.0 and m["nonfinite_test"] == 0
    assert m["numel"] == 6 * 48
    unmasked = tensor_metrics(ref, test)
    assert unmasked["rel_l2"] == math.inf


def test_nan_in_test_fails():
    ref = _randn(10)
    test = ref.clone()
    test[3] = float("nan")
    m = tensor_metrics(ref, test)
    assert m["nonfinite_test"] == 1 and m["nonfinite_ref"] == 0 and m["nonfinite_mismatch"] == 1
    assert m["rel_l2"] == math.inf and m["max_abs"] == math.inf
    assert not (m["cosine"] >= 0.99)  # NaN fails any >= gate


def test_matching_nonfinite_is_counted_and_skipped():
    ref = torch.tensor([1.0, float("-inf"), 2.0])
    test = torch.tensor([1.0, float("-inf"), 2.0])
    m = tensor_metrics(ref, test)
    assert m["nonfinite_ref"] == 1 and m["nonfinite_test"] == 1 and m["nonfinite_mismatch"] == 0
    assert m["rel_l2"] == 0.0 and m["cosine"] == pytest.approx(1.0)
    assert tensor_metrics(ref, torch.tensor([1.0, float("inf"), 2.0]))["rel_l2"] == math.inf


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape mismatch"):
        tensor_metrics(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mask"):
        tensor_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))


def test_empty_mask_fails():
    x = torch.ones(2, 3)
    m = tensor_metrics(x, x, torch.zeros(2, dtype=torch.bool))
    assert m["numel"] == 0 and math.isnan(m["rel_l2"])


@FAST
@given(st.integers(1, 64), st.integers(0, 10_000), st.floats(0.5, 2.0))
def test_scale_property(n, seed, scale):
    x = _randn(n, seed=seed, dtype=torch.float64)
    m = tensor_metrics(x, scale * x)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert m["rel_l2"] == pytest.approx(abs(scale - 1.0), abs=1e-12)


# ------------------------------------------------------------------------------------------------- logits


@FAST
@given(st.integers(1, 5), st.integers(1, 40), st.integers(1, 24), st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_the_one_sync_path_equals_the_chunked_one(b, s, h, seed, keep_share):
    """The accelerator path (``_one_sync``: masked elements zeroed, one device-to-host read; elementwise work in
    float32, sums in float64) against the chunked path (float64 throughout) on the same numbers, run here on the host:
    every metric within float32's rounding of each term (2**-24 relative; 1e-6 asserted), on bf16 inputs (what a bf16
    run compares: their products and differences are exact in float32, the differences' squares rounded) and on fp32
    ones; p99 from the same sample (every element below 2**20); an empty mask NaN; a non-finite value handed back
    (None)."""
    from parity.engine.metrics import _one_sync

    g = torch.Generator().manual_seed(seed)
    ref32 = torch.randn(b, s, h, generator=g)
    test32 = ref32 + 1e-3 * torch.randn(b, s, h, generator=g)
    mask = torch.rand(b, s, generator=g) < keep_share
    for dtype, rel in ((torch.bfloat16, 1e-6), (torch.float32, 1e-6)):
        ref, test = ref32.to(dtype), test32.to(dtype)
        for m in (None, mask):
            want = tensor_metrics(ref, test, m)
            keep = None if m is None else m[..., None].expand(b, s, h).reshape(-1)
            got = _one_sync(ref.reshape(-1), test.reshape(-1), keep)
            assert got["numel"] == want["numel"] and got["nonfinite_mismatch"] == 0
            for k in ("cosine", "rel_l2", "max_abs", "p99_abs", "mean_abs"):
                if math.isnan(want[k]):
                    assert math.isnan(got[k]), k
                else:
                    assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-300), (dtype, k)
    for v in (float("nan"), float("inf"), 3e38):  # not finite, or a square past float32's range
        bad = test32.clone().reshape(-1)
        bad[0] = v
        assert _one_sync(ref32.reshape(-1), bad, None) is None, v


def test_the_one_sync_path_says_identical_is_identical():
    from parity.engine.metrics import _one_sync

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float32):
        got = _one_sync(x.to(dtype), x.to(dtype).clone(), None)
        assert got["rel_l2"] == 0.0 and got["max_abs"] == 0.0 and got["p99_abs"] == 0.0
        assert got["cosine"] == pytest.approx(1.0, abs=1e-15)


def test_bf16_step():
    assert bf16_step(20.0) == 0.125
    assert bf16_step(-20.0) == 0.125
    assert bf16_step(16.0) == 0.125 and bf16_step(31.99) == 0.125 and bf16_step(32.0) == 0.25
    assert bf16_step(1.0) == 2.0**-7
    assert bf16_step(0.0) > 0.0
    t = bf16_step(torch.tensor([20.0, 1.5]))
    assert t.tolist() == [0.125, 2.0**-7]
    # It really is the bf16 spacing: x + step is the next bf16 number above x.
    assert torch.tensor(20.125).bfloat16().item() == 20.125
    assert torch.tensor(20.0625).bfloat16().item() in (20.0, 20.125)


def test_kl_identical_is_exactly_zero():
    x = _randn(2, 6, 50) * 5
    m = logits_metrics(x, x.clone())
    assert m["kl_mean"] == 0.0 and m["kl_max"] == 0.0 and m["kl_p95"] == 0.0
    assert m["top1_agreement"] == 1.0 and m["top5_overlap"] == 1.0 and m["n_tokens"] == 12
    assert m["cosine"] == pytest.approx(1.0) and m["rel_l2"] == 0.0


def test_kl_two_class_by_hand():
    ref = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # p = [1/2, 1/2]
    test = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # q = [1/4, 3/4]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5 * ln(4/3)
    m = logits_metrics(ref, test)
    assert m["kl_mean"] == pytest.approx(expected, rel=1e-12)
    assert m["kl_max"] == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-12)
    assert m["worst_positions"][0]["batch"] == 0 and m["worst_positions"][0]["pos"] == 0


def test_kl_is_shift_invariant():
    x = _randn(3, 40, dtype=torch.float64)
    assert logits_metrics(x, x + 7.0)["kl_max"] == pytest.approx(0.0, abs=1e-12)


@FAST
@given(st.integers(1, 6), st.integers(2, 40), st.integers(0, 10_000), st.floats(0.01, 10.0))
def test_kl_nonnegative_property(tokens, vocab, seed, temp):
    ref = _randn(tokens, vocab, seed=seed) * temp
    test = ref + _randn(tokens, vocab, seed=seed + 1) * temp
    m = logits_metrics(ref, test)
    assert m["kl_max"] >= m["kl_p95"] >= 0.0 and m["kl_mean"] >= 0.0
    same = logits_metrics(ref, ref.clone())
    assert same["kl_max"] == 0.0


def test_near_tie_classification():
    # 4 tokens, vocab 4, top logit 20 -> bf16 step 0.125.
    ref = torch.tensor([
        [20.0, 20.0 - 0.0625, 0.0, 1.0],  # near tie (gap 0.0625 < 0.125), test flips -> near-tie flip
        [20.0, 19.5, 0.0, 1.0],           # decisive (gap 0.5), test flips -> decisive flip
        [20.0, 19.5, 0.0, 1.0],           # decisive, agrees
        [20.0, 20.0 - 0.1, 0.0, 1.0],     # near tie, agrees
    ])
    test = ref.clone()
    test[0, 1] = 20.01
    test[1, 1] = 20.5
    m = logits_metrics(ref, test)
    assert m["n_near_tie"] == 2 and m["n_decisive"] == 2
    assert m["top1_flips_near_tie"] == 1 and m["top1_flips_decisive"] == 1
    assert m["top1_agreement"] == 0.5 and m["top1_decisive_agreement"] == 0.5
    # Worst position is the decisive flip; its record carries the reference gap.
    worst = m["worst_positions"][0]
    assert (worst["pos"], worst["ref_top1"], worst["test_top1"], worst["gap"]) == (1, 0, 1, 0.5)
    assert [w["kl"] for w in m["worst_positions"]] == sorted((w["kl"] for w in m["worst_positions"]),
                                                              reverse=True)
    # An fp32-style tiny margin makes every position decisive.
    m2 = logits_metrics(ref, test, near_tie_margin=1e-4)
    assert m2["n_near_tie"] == 0 and m2["top1_flips_decisive"] == 2


def test_logits_mask_and_batch_positions():
    ref = _randn(2, 3, 10) * 3
    test = ref.clone()
    test[1, 2] = _randn(10, seed=9) * 3  # corrupted padding token
    test[0, 1, 0] += 1.0  # a real difference at a valid token
    mask = torch.tensor([[True, True, True], [True, True, False]])
    m = logits_metrics(ref, test, mask)
    assert m["n_tokens"] == 5
    assert m["worst_positions"][0]["batch"] == 0 and m["worst_positions"][0]["pos"] == 1
    assert all((w["batch"], w["pos"]) != (1, 2) for w in m["worst_positions"])
    assert m["max_abs"] == pytest.approx(1.0, abs=1e-6)


def test_top5_overlap_known_value():
    ref = torch.tensor([[10.0, 9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0]])
    test = torch.tensor([[10.0, 9.0, 8.0, 0.0, 0.0, 7.0, 6.0, 0.0]])  # top5 shares {0, 1, 2}
    assert logits_metrics(ref, test)["top5_overlap"] == pytest.approx(3 / 5)


# ------------------------------------------------------------------------------------------------- router


def test_router_jaccard_known_value():
    ref = torch.tensor([[0, 1], [2, 3]])
    test = torch.tensor([[1, 2], [3, 2]])  # {0,1} vs {1,2}: 1/3; {2,3} vs {3,2}: 1
    m = router_metrics(ref, test)
    assert m["jaccard_mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["exact_set_agreement"] == 0.5 and m["n_set_mismatch"] == 1 and m["n_tokens"] == 2
    assert m["decisive_flips"] == 1 and m["near_tie_flips"] == 0


def test_router_weight_mass_moved_known_value():
    ref_idx, test_idx = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 2], [3, 2]])
    ref_w = torch.tensor([[0.6, 0.4], [0.7, 0.3]], dtype=torch.float64)
    test_w = torch.tensor([[0.5, 0.5], [0.3, 0.7]], dtype=torch.float64)
    m = router_metrics(ref_idx, test_idx, ref_w, test_w)
    # token 0: 0.5 * (|.6-.5| + |.4-0| + |0-.5|) = 0.5; token 1: same weights per expert -> 0.
    assert m["weight_mass_moved"] == pytest.approx(0.25, abs=1e-12)
    dense_ref = torch.tensor([[0.6, 0.4, 0, 0], [0, 0, 0.7, 0.3]], dtype=torch.float64)
    dense_test = torch.tensor([[0.5, 0, 0.5, 0], [0, 0, 0.7, 0.3]], dtype=torch.float64)
    expected = (dense_test - dense_ref).norm().item() / dense_ref.norm().item()
    assert m["weight_rel_l2"] == pytest.approx(expected, rel=1e-12)


def test_router_near_tie_flips_and_mask():
    probs = torch.tensor([
        [0.4, 0.3, 0.3, 0.0],          # k=2: 2nd vs 3rd prob exactly tied -> near-tie flip
        [0.5, 0.3, 0.2, 0.0],          # decisive
        [0.5, 0.3, 0.2, 0.0],          # masked out
    ], dtype=torch.float64)
    ref = torch.tensor([[0, 1], [0, 1], [0, 1]])
    test = torch.tensor([[0, 2], [0, 2], [3, 2]])
    m = router_metrics(ref, test, mask=torch.tensor([True, True, False]), ref_probs=probs)
    assert m["n_tokens"] == 2 and m["n_set_mismatch"] == 2
    assert m["near_tie_flips"] == 1 and m["decisive_flips"] == 1


@FAST
@given(st.integers(1, 8), st.integers(1, 4), st.integers(4, 12), st.integers(0, 10_000))
def test_router_set_agreement_invariant_under_topk_order(tokens, k, experts, seed):
    gen = torch.Generator().manual_seed(seed)
    ref = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(tokens)])
    test = ref.gather(1, perm)
    w = torch.rand(tokens, k, generator=gen)
    m = router_metrics(ref, test, w, w.gather(1, perm))
    assert m["exact_set_agreement"] == 1.0 and m["jaccard_mean"] == 1.0 and m["n_set_mismatch"] == 0
    assert m["weight_mass_moved"] == pytest.approx(0.0, abs=1e-12) and m["weight_rel_l2"] == pytest.approx(0.0)
    other = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    m2 = router_metrics(ref, other)
    assert 0.0 <= m2["jaccard_mean"] <= 1.0
    assert m2["exact_set_agreement"] <= m2["jaccard_mean"]


# ------------------------------------------------------------------------------------------------ weights


def test_is_bit_exact():
    a = torch.tensor([0.0, 1.5, float("nan")])
    assert is_bit_exact(a, a.clone())  # NaN-safe
    assert not is_bit_exact(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not is_bit_exact(torch.ones(3), torch.ones(3, dtype=torch.float64))
    assert not is_bit_exact(torch.ones(3), torch.ones(1, 3))
    assert is_bit_exact(torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(2.0, dtype=torch.bfloat16))
    assert is_bit_exact(torch.arange(6.0).reshape(2, 3).t(), torch.arange(6.0).reshape(2, 3).t().contiguous())


def test_tensor_digest():
    a = _randn(4, 5)
    d = tensor_digest(a)
    assert len(d) == 16 and int(d, 16) >= 0
    assert tensor_digest(a.clone()) == d
    assert tensor_digest(torch.tensor([0.0])) != tensor_digest(torch.tensor([-0.0]))
    assert tensor_digest(a.bfloat16()) != tensor_digest(a)


def test_noise_floor_ratio():
    assert noise_floor_ratio(4e-3, 2e-3) == pytest.approx(2.0)
    assert noise_floor_ratio(1e-6, 0.0) == pytest.approx(1e6)


def test_router_agreeing_tokens_judge_the_weights_apart_from_flips():
    """A flip moves weight wholesale (rel-L2 ~1 on its token); the agreeing tokens' rel-L2 sees only the weights'
    own error, so a 10 % per-expert scale error stays visible beside a flip (issue 11, item 3)."""
    ref_idx = torch.tensor([[0, 1], [2, 3], [0, 3]])
    test_idx = torch.tensor([[1, 0], [2, 3], [0, 2]])  # token 2 flips expert 3 -> 2
    ref_w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]], dtype=torch.float64)
    test_w = torch.tensor([[0.4 * 1.1, 0.6 * 1.1], [0.7 * 1.1, 0.3 * 1.1], [0.5, 0.5]], dtype=torch.float64)
    probs = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.7, 0.3], [0.5, 0.0, 0.2, 0.3]], dtype=torch.float64)
    m = router_metrics(ref_idx, test_idx, ref_w, test_w, ref_probs=probs)
    assert m["n_agree"] == 2 and m["n_set_mismatch"] == 1
    assert m["agree_weight_rel_l2"] == pytest.approx(0.1, rel=1e-12)  # exactly the 10 % scale
    assert m["agree_weight_max_abs"] == pytest.approx(0.07, rel=1e-9)
    assert m["weight_rel_l2"] > 0.5  # the flip dominates the all-token number
    # the flipped token's margin: (p_2 - p_3) / p_2 = (0.3 - 0.2) / 0.3, decisive at the default margin
    assert m["flip_margins"] == [{"token": 2, "margin": pytest.approx(1 / 3), "near": False}]
    assert m["decisive_flips"] == 1
    loose = router_metrics(ref_idx, test_idx, ref_w, test_w, ref_probs=probs, tie_margin=0.5)
    assert loose["near_tie_flips"] == 1 and loose["decisive_flips"] == 0 and loose["flip_margins"][0]["near"]


def test_router_agreement_of_nothing_is_nan():
    ref_idx, test_idx = torch.tensor([[0, 1]]), torch.tensor([[2, 3]])
    w = torch.tensor([[0.5, 0.5]])
    m = router_metrics(ref_idx, test_idx, w, w)
    assert m["n_agree"] == 0 and math.isnan(m["agree_weight_rel_l2"]) and math.isnan(m["agree_weight_max_abs"])
