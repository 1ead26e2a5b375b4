"""Comparison metrics for parity checks (DESIGN.md section 6).

Pure functions on torch tensors. Every metric is computed in float64 (inputs are cast first; nothing
is ever computed in bf16). Results are plain Python numbers so they go straight into ``results.json``.

Conventions:
- ``mask`` is a boolean tensor over the *leading* dims of the compared tensor (e.g. a ``[b, s]`` valid-token
  mask for ``[b, s, h]`` activations); only ``True`` positions are compared, so padding never counts.
- Nothing compared (empty mask) gives NaN metrics, which fail every gate: a comparison of nothing is not
  evidence of parity.
- A non-finite value on one side that the other side does not have at the same position (NaN where the
  reference is finite, ``+inf`` against ``-inf``, ...) makes the result fail: ``rel_l2 = max_abs = inf``
  and ``cosine = nan``. Identical non-finite values on both sides (e.g. ``-inf`` masked logits) are
  counted but skipped; the metrics then describe the finite positions.
"""
from __future__ import annotations

import hashlib
import math

import torch

_NAN = float("nan")
_INF = float("inf")

__all__ = [
    "bf16_step",
    "is_bit_exact",
    "logits_metrics",
    "noise_floor_ratio",
    "router_metrics",
    "tensor_digest",
    "tensor_metrics",
]


# ----------------------------------------------------------------------------------------------- helpers


def _check_same_shape(ref: torch.Tensor, test: torch.Tensor, what: str = "tensors") -> None:
    if tuple(ref.shape) != tuple(test.shape):
        raise ValueError(f"{what}: shape mismatch, ref {tuple(ref.shape)} vs test {tuple(test.shape)}")


def _expand_mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """Broadcast a leading-dims mask (e.g. [b, s]) to ``shape`` (e.g. [b, s, h]) as a bool tensor."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device).to(torch.bool)
    if mask.dim() > len(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, more dims than the tensor {tuple(shape)}")
    mask = mask.reshape(tuple(mask.shape) + (1,) * (len(shape) - mask.dim()))
    try:
        return mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast over the leading dims of "
                         f"{tuple(shape)}") from None


def _quantile(x: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of a 1-D tensor (numpy's default), via kthvalue.

    ``torch.quantile`` refuses inputs over 2**24 elements; full-vocab logits are far larger.
    """
    n = x.numel()
    if n == 0:
        return _NAN
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    if x.is_cuda:  # CUDA kthvalue on one long slice runs in a single block (very slow); a sort is parallel
        v_lo, v_hi = torch.sort(x).values[[lo, hi]].tolist()
        return v_lo + (v_hi - v_lo) * (pos - lo)
    v_lo = x.kthvalue(lo + 1).values.item()
    v_hi = v_lo
    if hi != lo and int((x <= v_lo).sum().item()) < hi + 1:  # next order statistic is strictly larger
        v_hi = x[x > v_lo].min().item()
    return v_lo + (v_hi - v_lo) * (pos - lo)


def _ratio(num: float, den: float) -> float:
    """A relative error from its two norms: 0 when both are zero, inf when only the reference's is."""
    if den == 0.0:
        return 0.0 if num == 0.0 else _INF
    return num / den


# ------------------------------------------------------------------------------------------------ tensors


_CHUNK = 1 << 24  # elements per float64 chunk: big tensors (full-vocab logits) never exist in float64 at once
_SAMPLE = 1 << 24  # p99 is exact up to this many elements, from an evenly strided sample beyond
_SAMPLE_CUDA = 1 << 20  # on a GPU the p99 sample is a sort per tensor: kept small (the 26B run has ~2,500 rows)


def tensor_metrics(ref: torch.Tensor, test: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Cosine, relative L2, max/p99/mean abs error of ``test`` against ``ref`` (float64 accumulation).

    Keys: ``cosine``, ``rel_l2``, ``max_abs``, ``p99_abs``, ``mean_abs``, ``nonfinite_ref``,
    ``nonfinite_test``, ``nonfinite_mismatch`` (counts over compared elements) and ``numel`` (elements
    compared after masking). Works chunk by chunk; ``p99_abs`` comes from an evenly strided sample of at
    most 2**24 differences (2**20 on a GPU; exact below that size).
    """
    _check_same_shape(ref, test)
    test = test.to(ref.device)
    m = _expand_mask(mask, ref.shape, ref.device)
    r_all, t_all = ref.detach().reshape(-1), test.detach().reshape(-1)
    if ref.is_cuda and r_all.numel() <= _CHUNK:  # on an accelerator: one device sync for the whole tensor
        one = _one_sync(r_all, t_all, None if m is None else m.reshape(-1))
        if one is not None:
            return one
    n, m_all = r_all.numel(), None
    if m is not None:  # masks are applied chunk by chunk
        n = int(m.sum())
        m_all = None if n == m.numel() else m.reshape(-1)
    out = {"numel": int(n), "nonfinite_ref": 0, "nonfinite_test": 0, "nonfinite_mismatch": 0}
    if n == 0:
        out.update(cosine=_NAN, rel_l2=_NAN, max_abs=_NAN, p99_abs=_NAN, mean_abs=_NAN)
        return out
    stride = max(1, -(-n // (_SAMPLE_CUDA if ref.is_cuda else _SAMPLE)))
    dot = rr = tt = dd = sad = 0.0
    mx = 0.0
    samples = []
    seen = 0
    for start in range(0, r_all.numel(), _CHUNK):
        r = r_all[start:start + _CHUNK]
        t = t_all[start:start + _CHUNK]
        if m_all is not None:
            keep = m_all[start:start + _CHUNK]
            r, t = r[keep], t[keep]
        r, t = r.to(torch.float64), t.to(torch.float64)
        pos, seen = seen, seen + r.numel()
        if not r.numel():
            continue
        diff = (t - r).abs()
        # one device sync per chunk: the sums, and how many values are not finite (then the chunk is redone)
        c_dot, c_rr, c_tt, c_dd, c_sad, c_mx, bad_r, bad_t = torch.stack([
            torch.dot(r, t), torch.dot(r, r), torch.dot(t, t), torch.dot(diff, diff), diff.sum(), diff.max(),
            (~torch.isfinite(r)).sum().to(torch.float64), (~torch.isfinite(t)).sum().to(torch.float64)]).tolist()
        if bad_r or bad_t:
            fin_r, fin_t = torch.isfinite(r), torch.isfinite(t)
            same = ~fin_r & ~fin_t & ((r == t) | (torch.isnan(r) & torch.isnan(t)))
            out["nonfinite_ref"] += int(bad_r)
            out["nonfinite_test"] += int(bad_t)
            out["nonfinite_mismatch"] += int(((~fin_r | ~fin_t) & ~same).sum().item())
            finite = fin_r & fin_t
            r, t = r[finite], t[finite]
            diff = (t - r).abs()
            c_dot = c_rr = c_tt = c_dd = c_sad = c_mx = 0.0
            if diff.numel():
                c_dot, c_rr, c_tt, c_dd, c_sad, c_mx = torch.stack([
                    torch.dot(r, t), torch.dot(r, r), torch.dot(t, t), torch.dot(diff, diff), diff.sum(),
                    diff.max()]).tolist()
        dot, rr, tt, dd, sad, mx = dot + c_dot, rr + c_rr, tt + c_tt, dd + c_dd, sad + c_sad, max(mx, c_mx)
        offset = (-pos) % stride
        samples.append(diff[offset::stride])
    if out["nonfinite_mismatch"]:
        out.update(cosine=_NAN, rel_l2=_INF, max_abs=_INF, p99_abs=_INF, mean_abs=_INF)
        return out
    cosine, rel = _cosine_rel(dot, rr, tt, dd)
    n_fin = n - out["nonfinite_ref"]
    sample = torch.cat(samples) if samples else torch.zeros(0, dtype=torch.float64)
    out.update(cosine=cosine, rel_l2=rel, max_abs=mx,
               p99_abs=_quantile(sample, 0.99) if sample.numel() else 0.0,
               mean_abs=sad / n_fin if n_fin else 0.0)
    return out


def _cosine_rel(dot: float, rr: float, tt: float, dd: float) -> tuple[float, float]:
    """Cosine and relative L2 from the sums ``r.t``, ``r.r``, ``t.t`` and ``d.d`` (d = t - r)."""
    norm_r, norm_t = math.sqrt(rr), math.sqrt(tt)
    if norm_r == 0.0 and norm_t == 0.0:
        cosine = 1.0
    elif norm_r == 0.0 or norm_t == 0.0:
        cosine = 0.0
    else:
        cosine = (dot / norm_r) / norm_t
    return cosine, (0.0 if dd == 0.0 else _INF) if norm_r == 0.0 else math.sqrt(dd) / norm_r


def _one_sync(r: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None) -> dict | None:
    """``tensor_metrics`` of flat ``r``, ``t`` (one chunk) over ``keep`` with a single device-to-host transfer: masked
    elements zeroed rather than selected (a boolean selection waits for its size), the count, the sums, the maximum and
    the p99 sample's order statistics (the sample strided over every element; the masked ones sorted below the rest)
    read in one ``tolist``. On a GPU each sync stalls the queue of work behind it: the 26B run has ~4,000 rows,
    each 3-4 syncs on the chunked path. Elementwise work in float32 (each term within 2**-24 of its float64 value;
    bf16 inputs' products and differences exact), every sum accumulated in float64: float64 copies of each tensor made this path memory-bound
    (6.2 s of the 26B run's 11.1 s of metrics on an H100). A non-finite sum means a non-finite element (a float32 square
    overflows only past 1.8e19): None then, or where no sampled element is kept -- the chunked path sorts those out."""
    f64 = torch.float64
    r, t = r.float(), t.float()
    size = r.numel()
    stride = max(1, -(-size // _SAMPLE_CUDA))
    if keep is not None:
        zero = torch.zeros((), dtype=r.dtype, device=r.device)
        r, t = torch.where(keep, r, zero), torch.where(keep, t, zero)
    diff = (t - r).abs()
    sample = diff[::stride]
    sample_keep = None if keep is None else keep[::stride]
    n = torch.tensor(float(size), dtype=f64, device=r.device) if keep is None else keep.sum().double()
    n_s = torch.tensor(float(sample.numel()), dtype=f64, device=r.device) if keep is None \
        else sample_keep.sum().double()
    ordered = torch.sort(sample if keep is None else torch.where(sample_keep, sample, -1.0)).values.double()
    pos = 0.99 * (n_s - 1).clamp_min(0)
    lo = pos.floor()
    base = sample.numel() - n_s  # the masked elements sort first
    last = sample.numel() - 1
    v_lo = ordered[(base + lo).long().clamp(0, last)]
    v_hi = ordered[(base + torch.minimum(lo + 1, n_s - 1)).long().clamp(0, last)]
    p99 = v_lo + (v_hi - v_lo) * (pos - lo)
    (dot, rr, tt, dd, sad, mx, count, count_s, q) = torch.stack([
        (r * t).sum(dtype=f64), (r * r).sum(dtype=f64), (t * t).sum(dtype=f64), (diff * diff).sum(dtype=f64),
        diff.sum(dtype=f64), diff.max().double(), n, n_s, p99]).tolist()
    if not all(math.isfinite(v) for v in (rr, tt, dd)) or (count and not count_s):
        return None
    out = {"numel": int(count), "nonfinite_ref": 0, "nonfinite_test": 0, "nonfinite_mismatch": 0}
    if not count:
        out.update(cosine=_NAN, rel_l2=_NAN, max_abs=_NAN, p99_abs=_NAN, mean_abs=_NAN)
        return out
    cosine, rel = _cosine_rel(dot, rr, tt, dd)
    out.update(cosine=cosine, rel_l2=rel, max_abs=mx, p99_abs=q, mean_abs=sad / count)
    return out


# ------------------------------------------------------------------------------------------------- logits


def bf16_step(x):
    """Spacing of bf16 numbers at magnitude ``|x|``: ``2**(floor(log2|x|) - 7)``; ``bf16_step(20.0) == 0.125``.

    Accepts a Python number (returns float) or a tensor (returns a float64 tensor). Zero and
    subnormals give the subnormal spacing 2**-133; non-finite inputs give inf.
    """
    is_tensor = isinstance(x, torch.Tensor)
    a = torch.as_tensor(x, dtype=torch.float64).abs()
    exponent = torch.frexp(a).exponent.clamp_min(-125)  # |x| = m * 2**e, m in [0.5, 1)
    step = torch.ldexp(torch.ones_like(a), exponent - 8)
    step = torch.where(torch.isfinite(a), step, torch.full_like(a, _INF))
    return step if is_tensor else step.item()


def _per_token(r: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row KL(ref||test), top-1s, ref top1-top2 gap and |top5 ∩ top5| for float64 [N, V] rows."""
    lp, lq = torch.log_softmax(r, dim=-1), torch.log_softmax(t, dim=-1)
    p = lp.exp()
    kl = (p * (lp - lq)).masked_fill_(p == 0, 0.0).sum(-1)  # 0 * log 0 = 0 (e.g. -inf vocab rows)
    kl = torch.where(torch.isnan(kl), torch.full_like(kl, _INF), kl).clamp_min(0.0)  # <0 is round-off

    vocab = r.shape[-1]
    k5 = min(5, vocab)
    ref_vals, ref_top = r.topk(min(2, vocab), dim=-1)
    test_top = t.topk(k5, dim=-1).indices
    ref_top5 = r.topk(k5, dim=-1).indices
    gap = ref_vals[:, 0] - ref_vals[:, 1] if vocab > 1 else torch.full_like(kl, _INF)
    overlap = (ref_top5.unsqueeze(-1) == test_top.unsqueeze(-2)).any(-1).sum(-1)
    return {
        "kl": kl,
        "ref_top1": r.argmax(-1),
        "test_top1": t.argmax(-1),
        "ref_max": ref_vals[:, 0],
        "gap": gap,
        "top5_overlap": overlap.to(torch.float64) / k5,
    }


def logits_metrics(ref_logits: torch.Tensor, test_logits: torch.Tensor, mask: torch.Tensor | None = None,
                   near_tie_margin: float | None = None, chunk_tokens: int = 256) -> dict:
    """Distribution-level comparison of logits ``[b, s, V]`` (or ``[T, V]``) over valid tokens.

    Per token: KL(ref||test) summed over the vocab (log_softmax in float64), top-1 agreement split into
    decisive and near-tie positions (ref top1 - top2 gap < ``near_tie_margin``; default: one bf16 step at
    the ref top-1 logit, see ``bf16_step``; pass a small number for fp32 runs), top-5 overlap.

    Keys: ``n_tokens``, ``kl_mean``, ``kl_p95``, ``kl_max``, ``top1_agreement``, ``top1_decisive_agreement``,
    ``n_decisive``, ``n_near_tie``, ``decisive_share`` (``n_decisive / n_tokens``: with too few decisive positions
    top-1 checks carry no signal), ``top1_flips_decisive``, ``top1_flips_near_tie``, ``top5_overlap``,
    ``worst_positions`` (up to 10 dicts ``batch``, ``pos``, ``kl``, ``ref_top1``, ``test_top1``, ``gap``,
    KL descending), plus every ``tensor_metrics`` key on the raw logits.
    """
    _check_same_shape(ref_logits, test_logits, "logits")
    if ref_logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [b, s, V] or [T, V], got shape {tuple(ref_logits.shape)}")
    test_logits = test_logits.to(ref_logits.device)
    out = tensor_metrics(ref_logits, test_logits, mask)

    ref3 = ref_logits if ref_logits.dim() == 3 else ref_logits.unsqueeze(0)
    test3 = test_logits if test_logits.dim() == 3 else test_logits.unsqueeze(0)
    b, s, vocab = ref3.shape
    if mask is None:
        valid = torch.ones(b * s, dtype=torch.bool, device=ref3.device)
    else:
        valid = torch.as_tensor(mask, device=ref3.device).to(torch.bool)
        valid = valid.reshape(1, -1) if ref_logits.dim() == 2 and valid.dim() == 1 else valid
        if tuple(valid.shape) != (b, s):
            raise ValueError(f"logits mask must be [b, s] (or [T]) = {(b, s)}, got {tuple(mask.shape)}")
        valid = valid.reshape(-1)
    rows = valid.nonzero().squeeze(-1)
    ref2, test2 = ref3.reshape(b * s, vocab), test3.reshape(b * s, vocab)

    parts = []
    for start in range(0, rows.numel(), chunk_tokens):  # chunked: full-vocab float64 is large
        idx = rows[start:start + chunk_tokens]
        parts.append(_per_token(ref2[idx].to(torch.float64), test2[idx].to(torch.float64)))
    n = int(rows.numel())
    out["n_tokens"] = n
    if n == 0:
        out.update(kl_mean=_NAN, kl_p95=_NAN, kl_max=_NAN, top1_agreement=_NAN, top1_decisive_agreement=_NAN,
                   n_decisive=0, n_near_tie=0, decisive_share=_NAN, top1_flips_decisive=0, top1_flips_near_tie=0,
                   top5_overlap=_NAN, worst_positions=[])
        return out
    tok = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    margin = bf16_step(tok["ref_max"]) if near_tie_margin is None else torch.full_like(tok["gap"], near_tie_margin)
    near = tok["gap"] < margin
    agree = tok["ref_top1"] == tok["test_top1"]
    n_near = int(near.sum().item())
    n_decisive = n - n_near
    flips_decisive = int((~agree & ~near).sum().item())
    kl = tok["kl"]
    out.update(
        kl_mean=kl.mean().item(),
        kl_p95=_quantile(kl, 0.95),
        kl_max=kl.max().item(),
        top1_agreement=agree.to(torch.float64).mean().item(),
        top1_decisive_agreement=1.0 - flips_decisive / n_decisive if n_decisive else 1.0,
        n_decisive=n_decisive,
        n_near_tie=n_near,
        decisive_share=n_decisive / n,
        top1_flips_decisive=flips_decisive,
        top1_flips_near_tie=int((~agree & near).sum().item()),
        top5_overlap=tok["top5_overlap"].mean().item(),
    )
    order = torch.argsort(kl, descending=True, stable=True)[:10]
    out["worst_positions"] = [
        {
            "batch": int(rows[i].item()) // s,
            "pos": int(rows[i].item()) % s,
            "kl": kl[i].item(),
            "ref_top1": int(tok["ref_top1"][i].item()),
            "test_top1": int(tok["test_top1"][i].item()),
            "gap": tok["gap"][i].item(),
        }
        for i in order.tolist()
    ]
    return out


# ------------------------------------------------------------------------------------------------- router


def _dense(idx: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter [T, k] expert indices (and weights) into a dense float64 [T, E] tensor."""
    src = torch.ones(idx.shape, dtype=torch.float64, device=idx.device) if weights is None \
        else weights.to(device=idx.device, dtype=torch.float64)
    return torch.zeros(idx.shape[0], num_experts, dtype=torch.float64, device=idx.device).scatter_add_(1, idx, src)


def router_metrics(ref_idx: torch.Tensor, test_idx: torch.Tensor, ref_weights: torch.Tensor | None = None,
                   test_weights: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                   ref_probs: torch.Tensor | None = None, tie_margin: float = 1e-6) -> dict:
    """Compare top-k routing decisions ``[T, k]`` (leading dims are flattened) as expert *sets*.

    Keys: ``n_tokens``, ``exact_set_agreement``, ``jaccard_mean``, ``n_set_mismatch``, ``near_tie_flips``,
    ``decisive_flips``, ``flip_margins`` (up to 10 mismatching tokens, largest margin first: ``token``,
    ``margin`` = the reference's relative k-th vs (k+1)-th probability gap ``(p_k - p_k+1) / p_k``, ``near``);
    with both weights: ``weight_mass_moved`` (mean of 0.5 * sum_e |w_ref(e) - w_test(e)|) and
    ``weight_rel_l2`` (on the dense [T, E] weights, all tokens), and over the tokens whose top-k *sets agree*
    only: ``n_agree``, ``agree_weight_rel_l2`` and ``agree_weight_max_abs`` -- the weights' own error, which a
    flip (a different expert, weight moved wholesale) cannot inflate; NaN when no token agrees.
    A mismatching token is a near-tie flip when ``ref_probs`` [T, E] is given and its margin is below
    ``tie_margin``; without ``ref_probs`` no flip can be explained, so all count as decisive.
    """
    _check_same_shape(ref_idx, test_idx, "router indices")
    k = ref_idx.shape[-1]
    ref_idx = ref_idx.reshape(-1, k).long()
    test_idx = test_idx.reshape(-1, k).long().to(ref_idx.device)
    keep = torch.ones(ref_idx.shape[0], dtype=torch.bool, device=ref_idx.device) if mask is None \
        else torch.as_tensor(mask, device=ref_idx.device).to(torch.bool).reshape(-1)
    if keep.numel() != ref_idx.shape[0]:
        raise ValueError(f"router mask has {keep.numel()} entries for {ref_idx.shape[0]} tokens")

    num_experts = int(max(torch.stack([ref_idx.max(), test_idx.max()]).tolist())) + 1 if ref_idx.numel() else 1
    if ref_probs is not None:
        ref_probs = ref_probs.reshape(-1, ref_probs.shape[-1]).to(ref_idx.device)
        num_experts = max(num_experts, ref_probs.shape[-1])
    ref_set = _dense(ref_idx[keep], num_experts) > 0
    test_set = _dense(test_idx[keep], num_experts) > 0

    same = (ref_set == test_set).all(-1)
    inter = (ref_set & test_set).sum(-1).to(torch.float64)
    union = (ref_set | test_set).sum(-1).to(torch.float64)
    jaccard = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    mismatch = ~same
    if ref_probs is not None and num_experts > k:
        top = ref_probs[keep].to(torch.float64).topk(k + 1, dim=-1).values
        margin = (top[:, k - 1] - top[:, k]) / top[:, k - 1].abs().clamp_min(1e-300)
        near = margin < tie_margin
    else:
        margin = torch.full(mismatch.shape, _INF, dtype=torch.float64, device=mismatch.device)
        near = torch.zeros_like(mismatch)
    tokens = keep.nonzero().squeeze(-1)
    flipped = mismatch.nonzero().squeeze(-1)
    worst = flipped[torch.argsort(margin[flipped], descending=True, stable=True)[:10]]
    # every scalar in one device sync (then the worst flips' token, margin and tie flag in one more)
    f64 = torch.float64
    scalars = [keep.sum(), same.to(f64).mean(), jaccard.mean(), mismatch.sum(), (mismatch & near).sum(),
               (mismatch & ~near).sum()]
    weighted = ref_weights is not None and test_weights is not None
    if weighted:
        _check_same_shape(ref_weights, test_weights, "router weights")
        w_ref = _dense(ref_idx[keep], num_experts, ref_weights.reshape(-1, k)[keep.to(ref_weights.device)])
        w_test = _dense(test_idx[keep], num_experts, test_weights.reshape(-1, k)[keep.to(test_weights.device)])
        delta = w_test - w_ref
        agree = delta[same]
        scalars += [(0.5 * delta.abs().sum(-1)).mean(), torch.linalg.vector_norm(delta.to(f64)),
                    torch.linalg.vector_norm(w_ref.to(f64)), same.sum(), torch.linalg.vector_norm(agree.to(f64)),
                    torch.linalg.vector_norm(w_ref[same].to(f64)),
                    agree.abs().max() if agree.numel() else torch.zeros((), device=agree.device)]
    vals = torch.stack([v.to(f64) for v in scalars]).tolist()
    n = int(vals[0])
    out = {
        "n_tokens": n,
        "exact_set_agreement": vals[1] if n else _NAN,
        "jaccard_mean": vals[2] if n else _NAN,
        "n_set_mismatch": int(vals[3]),
        "near_tie_flips": int(vals[4]),
        "decisive_flips": int(vals[5]),
        "flip_margins": [{"token": int(tok), "margin": mar, "near": bool(nr)} for tok, mar, nr in zip(
            *torch.stack([tokens[worst].to(f64), margin[worst], near[worst].to(f64)]).tolist())],
    }
    if weighted:
        moved, num, den, n_agree, a_num, a_den, a_max = vals[6:]
        n_agree = int(n_agree)
        out["weight_mass_moved"] = moved if n else _NAN
        out["weight_rel_l2"] = _ratio(num, den) if n else _NAN
        out["n_agree"] = n_agree
        out["agree_weight_rel_l2"] = _ratio(a_num, a_den) if n_agree else _NAN
        out["agree_weight_max_abs"] = a_max if n_agree else _NAN
    return out


# ------------------------------------------------------------------------------------------------ weights


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def is_bit_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same dtype, shape and bytes (so NaN == NaN, and -0.0 != 0.0)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return torch.equal(_bytes_view(a), _bytes_view(b.to(a.device)))


def tensor_digest(t: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of the tensor's raw bytes (dtype and shape are not hashed)."""
    return hashlib.sha256(_bytes_view(t).cpu().numpy().tobytes()).hexdigest()[:16]


def noise_floor_ratio(value: float, floor: float, eps: float = 1e-12) -> float:
    """``value / max(floor, eps)``: how many noise floors a measured error is."""
    return float(value) / max(float(floor), eps)
