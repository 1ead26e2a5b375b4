"""The backward mode for system ``megatron-bridge`` (NVIDIA Megatron-Bridge 0.6.2's Gemma 4) on ``gemma4-text-tiny-train``.

Its training step as its SFT users run it, with its provider's defaults (``parity.mbridge.training``), against HF's
loss and backward. Three things it does differently from HF's fp32 training step are findings
(docs/megatron-bridge-findings.md, 10-12), each pinned with its cause by switching that one default off in a
diagnostic run (``causes_removed``: a test-only build, never a case override): its fused cross entropy rounds the
logits gradient to bf16, its provider turns on a router load-balancing loss HF's Gemma 4 has no counterpart for,
and its post-attention norm's eps (finding 2) moves gradients past the gate. With all three removed every gradient
row agrees (our adapter's stand-ins have the backward TE has), and backward-only errors planted in the bridge's
own model (the forward bit for bit unchanged) fail at their exact row.

Skips (with the reason) where megatron-bridge is not importable: ``bash scripts/setup-cpu.sh --with-megatron-bridge``.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager

import pytest
import torch

from parity import mbridge

OK, WHY = mbridge.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Megatron-Bridge not importable: {WHY}")

if OK:
    from megatron.bridge.models.gemma import modeling_gemma4 as G4

    from parity.cases import load_case
    from parity.engine import pipeline
    from parity.engine.launch import cpu_threads
    from parity.mbridge import model as MB
    from parity.mbridge import training as T

CASE = "gemma4-text-tiny-train"
SYSTEM = "megatron-bridge"
FORWARD = ("end_to_end", "isolated")
GRADIENTS = ("loss", "grad_output", "grad_input", "param_grad")
ISOLATED = ("isolated_grad_input", "isolated_param_grad")
ALL_CAUSES = ("fused_cross_entropy", "aux_loss", "post_norm_eps", "qk_norm_tp_sum")


@contextmanager
def causes_removed(*causes: str):
    """Megatron-Bridge built with the named defaults switched off (diagnostic runs only; the case's runs keep every
    default): ``fused_cross_entropy`` -> megatron-core's unfused vocab-parallel cross entropy,
    ``aux_loss`` -> ``moe_aux_loss_coeff = 0``, ``post_norm_eps`` -> the post-attention norm's eps = HF's 1e-6,
    ``qk_norm_tp_sum`` -> its dense model's config ``qk_layernorm = True`` (finding 20: megatron's finalize then sums
    the q/k norms' gradients over TP; its MoE model's says so already), ``embed_scale`` -> its text embedding scaled by
    sqrt(H) rounded to the embedding's dtype, as HF (finding 3: bf16 only; not in ``ALL_CAUSES``), ``experts_probs`` ->
    its experts' routing probabilities applied to their down projection's output in fp32 instead of to the bf16
    activation before it (finding 9's place; HF weights the outputs in fp32; not in ``ALL_CAUSES``)."""
    mp = pytest.MonkeyPatch()
    build = MB.build
    if "embed_scale" in causes:
        from megatron.bridge.models.gemma.gemma3_provider import Gemma3LanguageModelEmbedding
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

        def scaled(self, input_ids, position_ids, tokentype_ids=None):
            e = LanguageModelEmbedding.forward(self, input_ids, position_ids, tokentype_ids)
            return e * torch.tensor(self.config.hidden_size ** 0.5, dtype=e.dtype)
        mp.setattr(Gemma3LanguageModelEmbedding, "forward", scaled)
    if "experts_probs" in causes:
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        grouped = TEGroupedMLP.forward

        def probs_after(self, x, tokens_per_expert, permuted_probs, *args, **kwargs):
            out, bias = grouped(self, x, tokens_per_expert, torch.ones_like(permuted_probs), *args, **kwargs)
            return (out.float() * permuted_probs.float().unsqueeze(-1)).to(out.dtype), bias
        mp.setattr(TEGroupedMLP, "forward", probs_after)

    def built(*args, **kwargs):
        bm = build(*args, **kwargs)
        for config in {id(m.config): m.config for m in bm.model.modules() if hasattr(m, "config")}.values():
            if "fused_cross_entropy" in causes:
                config.cross_entropy_loss_fusion = False
            if "aux_loss" in causes:
                config.moe_aux_loss_coeff = 0.0
        if "qk_norm_tp_sum" in causes:
            T.language_model(bm.model).config.qk_layernorm = True
        if "post_norm_eps" in causes and not bm.dense:  # its MoE model's (finding 2); its dense model has no such norm
            for layer in T.language_model(bm.model).decoder.layers:
                layer.self_attention.linear_proj.post_layernorm.eps = bm.provider.layernorm_epsilon
        return bm
    mp.setattr(MB, "build", built)
    try:
        yield
    finally:
        mp.undo()


def _against(reference, *causes: str) -> dict:
    with cpu_threads("cpu"), causes_removed(*causes):
        return pipeline.against(reference, SYSTEM)


@pytest.fixture(scope="module")
def reference():
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case(CASE), device="cpu")
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def default(reference) -> dict:
    """The run as its users train it: every default of its provider."""
    return _against(reference)


@pytest.fixture(scope="module")
def clean(reference) -> dict:
    return _against(reference, *ALL_CAUSES)


def _rows(r: dict, modes, measured: bool = True) -> dict:
    return {(m["name"], m["mode"]): m for m in r["modules"]
            if m["mode"] in modes and (m.get("rel_l2") is not None) == measured}


def _first(r: dict) -> dict:
    return r["summary"]["first_divergence_detail"] or {}


# ---------------------------------------------------------------------------------------------------
# The mode runs, and what it compares

def test_backward_mode_runs_for_megatron_bridge(default):
    assert {m["name"]: m["ran"] for m in default["modes"]}["backward"] is True
    rows = _rows(default, GRADIENTS)
    counts = {mode: sum(m == mode for _, m in rows) for mode in GRADIENTS}
    # every HF parameter; output gradients of every observable row; input gradients where a module's input is HF's
    assert counts == {"loss": 1, "grad_output": 109, "grad_input": 74, "param_grad": 126}, counts
    train = default["train"]
    assert train["system_loss"] == T.LOSS_DESCRIPTION and train["overrides"] == {}
    assert train["loss"]["tokens"] == 2 * 40 - 5 - 2
    # its module tree reads some rows elsewhere: each such gradient is placed, or reported with the reason
    assert rows[("model.layers.3.input_layernorm", "grad_input")]["megatron_name"] == \
        "decoder.layers.3.self_attention.linear_qkv"  # the norm fused into linear_qkv: the linear's input is HF's
    assert rows[("model.layers.3.self_attn.o_proj", "grad_input")]["megatron_name"] == \
        "decoder.layers.3.self_attention.linear_proj"
    assert rows[("lm_head", "grad_input")]["megatron_name"] == "output_layer"
    reported = _rows(default, GRADIENTS, measured=False)
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn", "model.layers.3.experts",
                 "model.layers.3.pre_feedforward_layernorm"):
        assert reported[(name, "grad_input")]["detail"], name
    assert ("model.layers.3.input_layernorm", "grad_output") in reported


def test_gradients_come_back_through_its_own_export_with_the_k_eq_v_adjoint(reference):
    """Its import copies HF k_proj into linear_qkv's k *and* v slots on K=V layers; its forward takes V from the raw K
    (the v slot's output is dropped: the tie holds under training) and its export drops the v slot. The v slot's
    gradient is therefore exactly zero, and HF's k_proj gradient is the k slot's (plus that zero)."""
    with cpu_threads("cpu"), causes_removed(*ALL_CAUSES):
        from parity import registry
        from parity.engine.modes.backward import labels_of

        reference.release()
        sut = registry.get(SYSTEM)
        sut.build(reference.case.kind, reference.config, dtype=reference.torch_dtype, device="cpu")
        sut.load(reference.state)
        sut.prepare(reference.inputs)
        loss, _ = sut.train_loss(reference.inputs, labels_of(reference.inputs))
        loss.backward()
        tied = T._kv_tied_layers(sut.bm)
        assert tied == [2, 5]
        for i in tied:
            attn = sut.bm.model.decoder.layers[i].self_attention
            g = attn.linear_qkv.weight.grad.reshape(attn.num_query_groups_per_partition, -1,
                                                    attn.hidden_size_per_attention_head, attn.linear_qkv.weight.shape[-1])
            assert torch.count_nonzero(g[:, -1]) == 0 and torch.count_nonzero(g[:, -2]) > 0
        own = dict(sut.grads())
        hf = reference.extra["backward"]["grads"].out
        for i in tied:
            key = f"model.layers.{i}.self_attn.k_proj.weight"
            ref = hf[("param_grad", key)]
            assert ((own[key] - ref).norm() / ref.norm()) < 1e-5
        assert all(float(own[f"model.layers.{i}.layer_scalar"].abs().max()) == 0 for i in range(6))  # buffers: none


def test_te_stand_ins_have_the_backward_of_what_te_computes():
    """Each stand-in's input and parameter gradients (fp32) against float64 autograd of TE's documented operation,
    written out independently: the derivative of what they compute, nothing detached or straight-through."""
    import types

    from megatron.core.transformer.enums import AttnMaskType

    from parity.mbridge import substitutes as S

    cfg = types.SimpleNamespace(window_size=4, interleaved_attn_pattern=(2, 1), window_attn_skip_freq=None,
                                kv_channels=4, num_attention_heads=2, num_query_groups=1, normalization="RMSNorm",
                                layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=False,
                                params_dtype=torch.float32, tensor_model_parallel_size=1, sequence_parallel=False)
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    def rms(x, w, eps):
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5) * w

    def check(run, ref, tensors):
        out = run(*tensors)
        up = torch.randn(out.shape, generator=gen)
        ours = torch.autograd.grad(out, tensors, up)
        doubles = [t.detach().double().requires_grad_(True) for t in tensors]
        theirs = torch.autograd.grad(ref(*doubles), doubles, up.double())
        assert all(rel(a, b) < 1e-5 for a, b in zip(ours, theirs)), [rel(a, b) for a, b in zip(ours, theirs)]

    lin = S.LayerNormColumnParallelLinearSubstitute(8, 6, config=cfg)
    check(lambda x, w, g: torch.func.functional_call(lin, {"weight": w, "layer_norm_weight": g}, (x,))[0],
          lambda x, w, g: rms(x, g, 1e-6) @ w.T, [leaf(5, 8), leaf(6, 8), leaf(8)])
    proj = S.RowParallelLinearPostNormSubstitute(6, 8, config=cfg)
    check(lambda x, w, g: torch.func.functional_call(proj, {"weight": w, "post_layernorm.weight": g}, (x,))[0],
          lambda x, w, g: rms(x @ w.T, g, 1e-5), [leaf(5, 6), leaf(8, 6), leaf(8)])
    grouped = S.ColumnParallelGroupedLinearSubstitute(2, 4, 3, config=cfg)
    check(lambda x, w0, w1: torch.func.functional_call(grouped, {"weight0": w0, "weight1": w1}, (x, [2, 3]))[0],
          lambda x, w0, w1: torch.cat([x[:2] @ w0.T, x[2:] @ w1.T]), [leaf(5, 4), leaf(3, 4), leaf(3, 4)])
    att = S.CoreAttentionSubstitute(cfg, 1, AttnMaskType.causal, "self")  # sliding layer: window (3, 0)
    s = 7
    i, j = torch.arange(s).view(s, 1), torch.arange(s).view(1, s)
    allowed = (j <= i) & (i - j <= 3)

    def attention(q, k, v):  # [s, b, h, d], one KV group for two heads
        scores = torch.einsum("shd,thd->hst", q[:, 0], k[:, 0].expand(-1, 2, -1)) * q.shape[-1] ** -0.5
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return torch.einsum("hst,thd->shd", p, v[:, 0].expand(-1, 2, -1)).reshape(s, 1, -1)
    check(lambda q, k, v: att(q, k, v, None), attention, [leaf(s, 1, 2, 4), leaf(s, 1, 1, 4), leaf(s, 1, 1, 4)])


def test_core_attention_recomputes_in_its_backward_bit_for_bit():
    """The attention stand-in keeps no [b, heads, s, s] tensor for its backward: it recomputes it, as TE's fused and
    flash kernels do. At the 26B-A4B shape with 2,048 tokens the kept fp32 scores and probabilities were about 1 GiB a
    layer, and Megatron-Bridge's LoRA backward ran out of an 80 GB card. The output and the gradients are the ones
    with everything kept, bit for bit."""
    from parity.mbridge import substitutes as S

    gen = torch.Generator().manual_seed(0)
    s, b, h, d = 64, 1, 4, 8
    q, k, v = (torch.randn(s, b, n, d, generator=gen, dtype=torch.bfloat16).requires_grad_(True) for n in (h, 2, 2))
    mask = S.te_full_mask("causal", None, (-1, 0), s, s, "cpu")
    up = torch.randn(s, b, h * d, generator=gen, dtype=torch.bfloat16)
    kept = S._attend(q, k, v, mask, d**-0.5).permute(2, 0, 1, 3).reshape(s, b, -1)
    want = torch.autograd.grad(kept, (q, k, v), up)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = S.CoreAttentionSubstitute.forward(_Attn(h), q, k, v, None)
    got = torch.autograd.grad(out, (q, k, v), up)
    assert torch.equal(out, kept) and all(torch.equal(a, b_) for a, b_ in zip(got, want))
    assert saved == [(s, b, h, d), (s, b, 2, d), (s, b, 2, d), (1, 1, s, s)], saved  # q, k, v and the boolean mask


class _Attn:
    """What ``CoreAttentionSubstitute.forward`` reads of itself: a causal layer, no window, the default scale."""

    def __init__(self, heads: int):
        from megatron.core.transformer.enums import AttnMaskType

        self.attn_mask_type, self.window_size, self.softmax_scale, self.heads = AttnMaskType.causal, None, None, heads


# ---------------------------------------------------------------------------------------------------
# Findings, each with its cause

def test_finding_10_fused_cross_entropy_rounds_the_logits_gradient_to_bf16(default, clean):
    """Its provider (and its Gemma 4 SFT recipes) turn on ``cross_entropy_loss_fusion`` with the 'native' kernel:
    megatron-core's ``fused_vocab_parallel_cross_entropy``, whose backward ends in ``grad_input.to(torch.bfloat16)``
    whatever the logits' dtype. The loss is exact; the logits gradient of an fp32 run is rounded to bf16, and every
    gradient after it with it. The isolated backward puts it where it is: its loss alone on HF's logits (the first
    divergence), while every module alone on HF's gradients agrees; end to end the first row whose own gradient
    fails is lm_head's input gradient."""
    assert default["passed"] is False and default["checks"]["gradients"] is False
    assert all(default["checks"][k] for k in ("loss", "logits", "modules", "roundtrip"))
    loss = default["train"]["loss"]
    assert loss["rel_diff"] < 1e-6 and loss["per_token"]["rel_l2"] < 1e-5
    rows = _rows(default, GRADIENTS)
    assert 1e-3 < rows[("logits", "grad_output")]["rel_l2"] < 3e-3
    assert _first(default)["name"] == "loss" and _first(default)["mode"] == "isolated_grad_input"
    assert 1e-3 < _first(default)["value"] < 3e-3
    isolated = _rows(default, ISOLATED)
    assert [k for k, m in isolated.items() if not m["passed"]] == [("loss", "isolated_grad_input")]
    own = sorted((m for m in rows.values() if not m["passed"] and m["mode"] != "grad_output"), key=lambda m: m["order"])
    assert (own[0]["name"], own[0]["mode"]) == ("lm_head", "grad_input")
    assert sum(not m["passed"] for m in rows.values()) == len(rows) - 1  # every gradient row but the loss
    assert 5e-4 < loss["grad_norm"]["rel_diff"] < 5e-3
    # its optimizer step on those gradients: the first updates move through Adam's eps only (23-24 rows of 126 over
    # the gate, <= 1.2e-4), the trajectory's gradient norm stays 1.0-1.1e-3 off at every step
    assert default["checks"]["step"] is False and default["checks"]["trajectory"] is False
    assert all(1e-4 < d < 3e-3 for d in default["train"]["trajectory"]["rel_diff"]["grad_norm"])
    assert _rows(clean, GRADIENTS)[("logits", "grad_output")]["rel_l2"] < 1e-5  # unfused: the logits gradient agrees


def test_finding_10_the_fused_kernel_on_its_own():
    """The kernel alone, fp32 logits: same loss as the unfused one, a gradient whose every element is a bf16 value."""
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from parity import megatron_env

    megatron_env.init(tp=1, ep=1, seed=0)
    logits = torch.randn(7, 2, 50, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 50, (7, 2), generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for fused in (True, False):
        x = logits.clone().requires_grad_(True)
        loss = (fused_vocab_parallel_cross_entropy(x.clone(), target, parallel_state.get_tensor_model_parallel_group())
                if fused else vocab_parallel_cross_entropy(x.clone(), target))
        loss.sum().backward()
        grads.append(x.grad)
        losses.append(loss.detach())
    assert grads[0].dtype == torch.float32
    assert torch.equal(grads[0], grads[0].bfloat16().float())  # every element representable in bf16
    assert not torch.equal(grads[1], grads[1].bfloat16().float())
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    rel = float((grads[0] - grads[1]).norm() / grads[1].norm())
    assert 1e-4 < rel < 4e-3, rel


def test_finding_11_its_router_load_balancing_loss_trains_the_router(reference):
    """Its provider sets ``moe_router_load_balancing_type='aux_loss'`` with ``moe_aux_loss_coeff=1e-3`` (its SFT
    recipes keep them); in training mode megatron-core's router attaches that loss to the routing probabilities
    (``MoEAuxLossAutoScaler``: the loss value is untouched, its gradient joins in the backward). HF's Gemma 4 has no
    auxiliary loss. With the other two causes removed the first failing row is the last MoE layer's router; its
    gradient then reaches every earlier layer through the router's input (the residual stream)."""
    r = _against(reference, "fused_cross_entropy", "post_norm_eps")
    assert r["passed"] is False and r["checks"]["loss"] is True
    first = _first(r)
    assert first["name"] == "model.layers.5.router.proj.weight" and first["mode"] == "param_grad", first
    rows = _rows(r, GRADIENTS)
    routers = [m["rel_l2"] for (name, mode), m in rows.items() if name.endswith((".router.proj.weight", ".router.scale"))]
    assert len(routers) == 12 and min(routers) > 1e-4 and max(routers) < 3e-3, (min(routers), max(routers))
    assert rows[("model.layers.5.router.per_expert_scale", "param_grad")]["passed"]  # after the aux loss's branch
    assert r["train"]["loss"]["rel_diff"] < 1e-6  # not part of the loss value


def test_finding_2_post_attention_norm_eps_moves_gradients_past_the_gate(reference, clean):
    """Finding 2 (its post-attention norm built with TENorm's default eps 1e-5, HF's is 1e-6) passes the forward gate
    on this case (worst forward row 8.2e-6) but not the gradient gate: q/k norms' and projections' gradients reach
    1.2-1.6e-5. With HF's eps every gradient row is <= 2e-6."""
    r = _against(reference, "fused_cross_entropy", "aux_loss")
    assert r["passed"] is False and r["checks"]["modules"] is True and r["checks"]["loss"] is True
    rows = _rows(r, GRADIENTS)
    worst = max(m["rel_l2"] for m in rows.values())
    assert 1e-5 < worst < 3e-5, worst
    assert _first(r)["name"].startswith("model.layers.5.self_attn."), _first(r)
    assert max(m["rel_l2"] for m in _rows(clean, GRADIENTS).values()) < 2.5e-6


# ---------------------------------------------------------------------------------------------------
# With the three causes removed: clean

def test_clean_backward_with_the_causes_removed(clean):
    assert clean["passed"] is True, _first(clean)
    rows = _rows(clean, GRADIENTS)
    assert len(rows) == 1 + 109 + 74 + 126
    assert max(m["rel_l2"] for m in rows.values()) < 2.5e-6
    # the isolated backward: each of its modules alone on HF's input and output gradient; its fused input norm +
    # linear_qkv runs on another module's input (TE's LayerNormColumnParallelLinear): not run alone, said so
    isolated = _rows(clean, ISOLATED)
    assert {m: sum(k[1] == m for k in isolated) for m in ISOLATED} == {"isolated_grad_input": 81,
                                                                       "isolated_param_grad": 87}
    assert max(m["rel_l2"] for m in isolated.values()) < 1e-5
    skipped = _rows(clean, ISOLATED, measured=False)
    assert all("on another module's input" in m["detail"] or "no module to run alone" in m["detail"]
               for m in skipped.values()) and len(skipped) == 18
    loss = clean["train"]["loss"]
    assert loss["rel_diff"] < 1e-6 and loss["grad_norm"]["rel_diff"] < 1e-6
    # its optimizer step (megatron-core's at data-parallel size 1: AdamW) and the 10-step trajectory
    steps = _rows(clean, ("param_step",))
    assert len(steps) == 126 and max(m["rel_l2"] for m in steps.values()) < 1e-7
    assert clean["checks"]["step"] is True and clean["train"]["trajectory"]["worst_rel_diff"] < 1e-6
    for layer in (2, 5):  # K=V: V taken from the raw K, its gradient reaches k_proj
        assert rows[(f"model.layers.{layer}.self_attn.k_proj", "grad_output")]["rel_l2"] < 1e-5
        assert rows[(f"model.layers.{layer}.self_attn.k_proj.weight", "param_grad")]["rel_l2"] < 1e-5


def test_its_bf16_training_step_fails_where_findings_3_and_9_say():
    """Its training step in bf16 (``gemma4-text-tiny-train-bf16``), its training-step findings removed: finding 3 (its
    embedding scaled by sqrt(H) as a Python float, HF by sqrt(H) rounded to bf16) fails the embedding row and, through
    it, the trajectory's first gradient norm (1.5e-3 from HF-bf16's against a gate of 1.2e-3). With the embedding
    scaled as HF's every forward row, the step and the trajectory pass; what is left fails the truth gate only: layer
    5's expert output gradient (the input gradient of the norm after it) and two routers' scale gradients, 1.5-2.1 x as
    far from HF-fp32 as HF-bf16 is. With the probabilities applied to the experts' outputs in fp32 too (finding 9's
    place removed) the expert output gradient passes and the routers' three rows stay: finding 9 is part of it, not the
    whole (by hand, seeds 1 and 2: 8-9 MoE-block parameter gradients of the last layers, up to 7 x; with both removed
    seed 1 is clean but for HF's own unstable row, seed 2 keeps 8 rows of layer 5). What is left with both removed is
    in layers whose router sends a token or two to other experts end to end while alone it routes as HF (seed 0:
    layers 3 and 5, one token each; seed 2: layer 5, two), and each such row says so."""
    # megatron's fused activations are torch.compile'd (its jit_fuser) until their recompile limit, then eager: a bf16
    # gelu rounded once or after every op, and eager fails the experts' forward rows too. What ran before in this
    # process decides which, so the compile caches start afresh here (the run as a fresh process runs it)
    torch._dynamo.reset()
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case("gemma4-text-tiny-train-bf16"), device="cpu")
        try:
            with causes_removed(*ALL_CAUSES):
                found = pipeline.against(ref, SYSTEM)
            with causes_removed(*ALL_CAUSES, "embed_scale"):
                scaled = pipeline.against(ref, SYSTEM)
            with causes_removed(*ALL_CAUSES, "embed_scale", "experts_probs"):
                probs_after = pipeline.against(ref, SYSTEM)
        finally:
            ref.close()
    moe = re.compile(r"model\.layers\.\d+\.(router|experts|(pre|post)_feedforward_layernorm(_2)?)\b")

    def failing(r):
        return {(m["name"], m["mode"]): m for m in r["modules"] if m.get("passed") is False}

    embedding = {("model.embed_tokens", "end_to_end"), ("model.embed_tokens", "isolated")}
    bad = failing(found)
    assert embedding <= set(bad) and all(moe.match(name) for name, _ in set(bad) - embedding), sorted(bad)
    traj = found["train"]["trajectory"]
    assert traj["passed"] is False and traj["rel_diff"]["grad_norm"][0] > traj["gate"]["grad_norm"][0]
    for run in (scaled, probs_after):  # the embedding as HF's: the forward, the step and the trajectory pass
        assert run["checks"]["modules"] and run["checks"]["step"] and run["checks"]["trajectory"], run["checks"]
        left = failing(run)
        assert all(moe.match(name) and m["why"].startswith("accuracy:") for (name, _), m in left.items()), sorted(left)
    # the cause of what is left with both removed: each failing row's layer routes a token to other experts end to
    # end (its accumulated bf16 drift, within the forward gates, tips a decision), while alone it routes as HF
    left = failing(probs_after)
    assert left and all("to other experts end to end" in m["why"] and "routes every token as HF" in m["why"]
                        for m in left.values()), sorted((k, m["why"]) for k, m in left.items())
    assert failing(scaled), "its bf16 step with finding 3 removed still fails the truth gate in its MoE blocks"


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_clean_backward_on_more_seeds(seed):
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case(CASE), device="cpu", seed=seed)
        try:
            with causes_removed(*ALL_CAUSES):
                r = pipeline.against(ref, SYSTEM)
        finally:
            ref.close()
    worst = max(m["rel_l2"] for m in _rows(r, GRADIENTS).values())
    assert r["passed"] is True and worst < 1e-5, (seed, _first(r), worst)


# ---------------------------------------------------------------------------------------------------
# Backward-only errors planted in Megatron-Bridge's own model: the forward bit for bit unchanged

class _StraightThrough(torch.autograd.Function):
    """``scale * tanh(x / scale)`` (the bridge's ``_logit_softcapping``, bit for bit); its derivative taken as 1."""

    @staticmethod
    def forward(ctx, x, scale):
        return scale * torch.tanh(x / scale)

    @staticmethod
    def backward(ctx, g):
        return g, None


def plant_straight_through_softcap(mp):
    mp.setattr(G4, "_logit_softcapping", lambda logits, scale: _StraightThrough.apply(logits, scale) if scale else logits)


def plant_kv_tie_without_gradient(mp):
    """V = the raw K, detached: the tie holds in the forward, k_proj misses V's gradient."""
    tied = G4.Gemma4SelfAttention._get_tied_query_key_value_tensors

    def planted(self, hidden_states, key_value_states=None):
        q, k, v = tied(self, hidden_states, key_value_states)
        return q, k, v.detach()
    mp.setattr(G4.Gemma4SelfAttention, "_get_tied_query_key_value_tensors", planted)


def plant_post_ffn_norm_rms_detached(mp):
    """The last layer's post_ffn_layernorm with its 1/rms detached (``_gemma4_rms_norm``'s expression otherwise)."""
    forward = G4.Gemma4RMSNorm.forward

    def planted(self, hidden_states):
        if getattr(self, "_planted", False):
            h = hidden_states.float()
            return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5).detach()
                    * self.weight.float()).type_as(hidden_states)
        return forward(self, hidden_states)
    mp.setattr(G4.Gemma4RMSNorm, "forward", planted)
    build = MB.build

    def built(*args, **kwargs):
        bm = build(*args, **kwargs)
        bm.model.decoder.layers[-1].post_ffn_layernorm._planted = True
        return bm
    mp.setattr(MB, "build", built)


def plant_combine_probs_detached(mp):
    """megatron-core's TEGroupedMLP given the routing probabilities detached: the router learns nothing from the
    expert outputs they weight."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    forward = TEGroupedMLP.forward

    def planted(self, hidden, tokens_per_expert, permuted_probs, *args, **kwargs):
        return forward(self, hidden, tokens_per_expert, permuted_probs.detach(), *args, **kwargs)
    mp.setattr(TEGroupedMLP, "forward", planted)


def plant_loss_over_padding(mp):
    """Its masked_next_token_loss with a loss mask of ones: every position counted, padding and the last included."""
    from megatron.bridge.training import losses

    loss = losses.masked_next_token_loss

    def planted(loss_mask, output_tensor, **kwargs):
        return loss(torch.ones_like(loss_mask), output_tensor, **kwargs)
    mp.setattr(losses, "masked_next_token_loss", planted)


BRIDGE_BACKWARD_PLANTS = [
    ("straight-through softcap", plant_straight_through_softcap, "lm_head", "grad_input"),
    ("K=V tie without gradient", plant_kv_tie_without_gradient, "model.layers.5.self_attn.k_proj.weight", "param_grad"),
    ("post_ffn norm 1/rms detached", plant_post_ffn_norm_rms_detached, "model.layers.5.post_feedforward_layernorm",
     "grad_input"),
    ("combine probabilities detached", plant_combine_probs_detached, "model.layers.5.router.per_expert_scale",
     "param_grad"),
    ("loss over padding", plant_loss_over_padding, "loss", "loss"),
]


@pytest.mark.parametrize("plant,where,mode", [p[1:] for p in BRIDGE_BACKWARD_PLANTS],
                         ids=[p[0] for p in BRIDGE_BACKWARD_PLANTS])
def test_backward_only_plant_in_the_bridge_is_caught_where_it_is(plant, where, mode, reference, clean):
    mp = pytest.MonkeyPatch()
    try:
        plant(mp)
        r = _against(reference, *ALL_CAUSES)
    finally:
        mp.undo()
    _caught_backward_only(r, clean, where, mode)


def _caught_backward_only(r: dict, clean: dict, where: str, mode: str) -> None:
    """``r`` fails first at ``(where, mode)`` by a clear margin, its forward bit for bit ``clean``'s."""
    assert r["passed"] is False
    first = _first(r)
    assert (first["name"], first["mode"]) == (where, mode), first
    assert first["value"] is None or math.isnan(first["value"]) or first["value"] > 1e-4, first
    before, after = _rows(clean, FORWARD), _rows(r, FORWARD)  # the forward, bit for bit
    assert before.keys() == after.keys()
    assert all(after[k]["rel_l2"] == before[k]["rel_l2"] for k in before), \
        [k for k in before if after[k]["rel_l2"] != before[k]["rel_l2"]][:3]
    assert r["checks"]["modules"] is True and r["checks"]["logits"] is True


# ---------------------------------------------------------------------------------------------------
# Its VLM training step (gemma4-vlm-tiny-train): HF's vision tower inside its Gemma4VLModel, its VLM step

VLM_CASE = "gemma4-vlm-tiny-train"
SLIDING = [f"model.language_model.layers.{i}" for i in (0, 1, 3, 4)]


@contextmanager
def image_blocks_causal():
    """HF's VLM built with its vision-bidirectional overlay off (``use_bidirectional_attention`` None): image blocks
    causal, as the bridge's TE-causal core attention computes them (finding 1). Diagnostic runs only: it removes
    finding 1 on HF's side, so that what is left to differ is the training step."""
    from parity import vlm_config as V

    mp = pytest.MonkeyPatch()
    builder = V.VLM_BUILDERS["tiny_vlm"]

    def causal(**kwargs):
        kw = builder(**kwargs)
        kw["text_config"]["use_bidirectional_attention"] = None
        return kw
    mp.setitem(V.VLM_BUILDERS, "tiny_vlm", causal)
    try:
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def vlm_default() -> dict:
    """Its VLM trained as its users train it: every default of its provider."""
    with cpu_threads("cpu"):
        return pipeline.run(load_case(VLM_CASE), device="cpu", system=SYSTEM)


@pytest.fixture(scope="module")
def vlm_causal_reference():
    with cpu_threads("cpu"), image_blocks_causal():
        ref = pipeline.reference(load_case(VLM_CASE), device="cpu")
    yield ref
    ref.close()


@pytest.fixture(scope="module")
def vlm_clean(vlm_causal_reference) -> dict:
    """Findings 1 (HF's overlay off), 10, 11 and 2 removed; HF's own backward on each side's weights after the first
    step kept (``sensitivity``: the vision tower's gradients on HF's weights and on the system's)."""
    import copy

    from parity.engine.modes import step as ST
    from parity.engine.modes.backward import labels_of

    ref, seen = vlm_causal_reference, {}
    updates = ST._updates

    def hf_vision_grads(state):
        model = copy.deepcopy(ref.model)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(state[k])
        with torch.enable_grad():
            ref.kind.forward_train(model, ref.inputs, labels_of(ref.inputs)).loss.backward()
        return {k: p.grad for k, p in model.named_parameters() if "vision" in k}

    def kept(c, hf, before, after):
        mine = {k: after[k] for k in hf["after"]}
        seen["weights"] = max(float((mine[k] - hf["after"][k]).abs().max()) for k in mine)
        a, b = hf_vision_grads(hf["after"]), hf_vision_grads(mine)
        seen["vision_grads"] = max(float((b[k] - a[k]).norm() / a[k].norm()) for k in a)
        return updates(c, hf, before, after)
    mp = pytest.MonkeyPatch()
    mp.setattr(ST, "_updates", kept)
    try:
        r = _against(ref, *ALL_CAUSES)
    finally:
        mp.undo()
    r["sensitivity"] = seen
    return r


def test_its_vlm_training_step_runs_with_its_defaults(vlm_default):
    """Its VLM step (labels and loss mask of its data path, the model called with labels, loss mask and pixel values,
    its loss function and megatron-core's schedule step) on HF's raw inputs: the loss, every parameter's gradient in
    HF layout (the vision tower's through its own export), its optimizer step. What fails is what the known findings
    say: end to end everything after layer 0's sliding mask (finding 1: the loss itself is 1.2e-4 off), and each
    module alone only where a finding is -- the sliding decoder layers (finding 1) and its loss alone (finding 10)."""
    r = vlm_default
    assert {m["name"]: m["ran"] for m in r["modes"]}["backward"] is True
    assert r["checks"] == {"logits": False, "modules": False, "router": False, "gradients": False, "step": False,
                           "roundtrip": True, "loss": False, "trajectory": False}
    first = _first(r)
    assert (first["name"], first["mode"]) == ("model.language_model.layers.0.self_attn", "end_to_end")
    assert "5922 mismatching entries" in first["why"]
    rows = _rows(r, GRADIENTS)
    counts = {mode: sum(m == mode for _, m in rows) for mode in GRADIENTS}
    assert counts == {"loss": 1, "grad_output": 166, "grad_input": 126, "param_grad": 155}, counts
    assert sum(k[1] == "param_grad" and "vision" in k[0] for k in rows) == 29  # the vision tower and embed_vision
    loss = r["train"]["loss"]
    assert loss["tokens"] == 37 and 5e-5 < loss["rel_diff"] < 5e-4  # finding 1 moves the loss itself
    assert r["train"]["system_loss"] == T.LOSS_DESCRIPTION and "VLM step" in T.LOSS_DESCRIPTION
    # each module alone: the sliding decoder layers (finding 1) and its loss alone (finding 10), nothing else
    isolated = _rows(r, ISOLATED)
    assert {m: sum(k[1] == m for k in isolated) for m in ISOLATED} == {"isolated_grad_input": 135,
                                                                       "isolated_param_grad": 116}
    failing = sorted(k[0] for k, m in isolated.items() if not m["passed"])
    assert failing == ["loss"] + SLIDING, failing
    assert 1e-3 < isolated[("loss", "isolated_grad_input")]["rel_l2"] < 3e-3  # finding 10, as on the text model
    assert max(m["rel_l2"] for k, m in isolated.items() if k[0] not in failing) < 1e-5
    assert sum("vision" in k[0] for k, m in isolated.items() if k[1] == "isolated_param_grad") == 29
    assert len(_rows(r, ("param_step",))) == 155


def test_its_vlm_training_step_with_the_findings_removed(vlm_clean, vlm_causal_reference):
    """Findings 1, 10, 11 and 2 removed: every gradient row agrees -- the vision tower's parameters, embed_vision,
    the soft-token scatter (embed_vision's output gradient), the loss mask of the images' soft tokens -- and so does
    its first optimizer step. The 10-step trajectory parts by up to 4e-5 in the gradient norm (losses within 5e-7):
    Adam's first step on gradients at round-off level (one element of layer 4's q_proj moves 15 % of lr apart where
    its gradient is at Adam's eps) leaves weights <= 2e-5 apart, and HF's own backward on the system's weights after
    that step gives vision-tower gradients 2.5e-3 from its backward on its own: this model's vision gradients
    amplify those differences, HF's as much as the system's. Our own system (``parity``) on the same HF reference
    parts from HF's trajectory the same way, step for step (within 1e-6 of the bridge's deviation at every step): not
    a divergence of its training step."""
    r = vlm_clean
    assert r["checks"] == {"logits": True, "modules": True, "router": True, "gradients": True, "step": True,
                           "roundtrip": True, "loss": True, "trajectory": False}
    rows = _rows(r, GRADIENTS)
    assert max(m["rel_l2"] for m in rows.values()) < 3e-6
    vision = [m["rel_l2"] for k, m in rows.items() if k[1] == "param_grad" and "vision" in k[0]]
    assert len(vision) == 29 and max(vision) < 3e-6
    assert rows[("model.vision_tower", "grad_output")]["rel_l2"] < 3e-6  # HF's own tower inside it: read in HF layout
    assert rows[("model.embed_vision", "grad_output")]["rel_l2"] < 3e-6  # what its soft-token scatter sends back
    isolated = _rows(r, ISOLATED)
    assert all(m["passed"] for m in isolated.values()) and len(isolated) == 135 + 116
    steps = _rows(r, ("param_step",))
    assert len(steps) == 155 and all(m["passed"] for m in steps.values())
    traj = r["train"]["trajectory"]["rel_diff"]
    assert max(traj["loss"]) < 1e-6 and 1e-5 < max(traj["grad_norm"]) < 1e-4, traj
    seen = r["sensitivity"]
    assert seen["weights"] < 3e-5 and 1e-3 < seen["vision_grads"] < 1e-2, seen
    # our own system on the same HF reference parts from HF's trajectory the same way, step for step
    with cpu_threads("cpu"):
        ours = pipeline.against(vlm_causal_reference, "parity")["train"]["trajectory"]["rel_diff"]["grad_norm"]
    assert 1e-5 < max(ours) < 1e-4 and max(abs(a - b) for a, b in zip(ours, traj["grad_norm"])) < 1e-6, ours


@pytest.mark.parametrize("seed", [1, 2])
def test_its_vlm_training_step_with_the_findings_removed_on_more_seeds(seed):
    """Seeds 1 and 2 as seed 0: every gradient row and first update agrees; the trajectory's gradient norm within
    1.2e-5 (seed 1: 1.16e-5 at one step, over the 1e-5 gate as seed 0's round-off amplification) and 7e-7 (seed 2)."""
    with cpu_threads("cpu"):
        with image_blocks_causal():
            ref = pipeline.reference(load_case(VLM_CASE), device="cpu", seed=seed)
        try:
            r = _against(ref, *ALL_CAUSES)
        finally:
            ref.close()
    assert all(r["checks"][k] for k in ("logits", "modules", "router", "gradients", "loss", "step")), r["checks"]
    assert max(m["rel_l2"] for m in _rows(r, GRADIENTS + ISOLATED).values()) < 1e-5
    traj = r["train"]["trajectory"]["rel_diff"]
    assert max(traj["loss"]) < 1e-6 and max(traj["grad_norm"]) < 2e-5, (seed, traj)


# Backward-only errors planted in its VLM path (its own code: the soft-token scatter, its data path's loss mask)

def plant_image_features_detached(mp, config):
    """Its ``Gemma4VLModel`` scatters the image features detached: the forward bit for bit, no gradient reaches
    ``embed_vision`` and the vision tower."""
    from megatron.bridge.models.gemma_vl.modeling_gemma4_vl import Gemma4VLModel

    scatter = Gemma4VLModel._scatter_modality_features

    def planted(self, inputs_embeds, input_ids, features, token_id, modality_name):
        return scatter(self, inputs_embeds, input_ids, features.detach(), token_id, modality_name)
    mp.setattr(Gemma4VLModel, "_scatter_modality_features", planted)


def plant_image_tokens_in_the_loss(mp, config):
    """Its data path's loss mask with the images' soft tokens left in (a collate whose skipped tokens miss the image
    token): the next-token loss at the positions before and inside each image counts."""
    from megatron.bridge.data import conversation_processing as CP

    shifted = CP.build_shifted_labels_and_loss_mask

    def planted(input_ids, assistant_loss_mask, *args, **kwargs):
        return shifted(input_ids, assistant_loss_mask | (input_ids == config.image_token_id), *args, **kwargs)
    mp.setattr(CP, "build_shifted_labels_and_loss_mask", planted)


VLM_PLANTS = [
    ("image features detached at the scatter", plant_image_features_detached,
     "model.embed_vision.embedding_projection.weight", "param_grad"),
    ("image soft tokens in its loss mask", plant_image_tokens_in_the_loss, "loss", "loss"),
]


@pytest.mark.parametrize("plant,where,mode", [p[1:] for p in VLM_PLANTS], ids=[p[0] for p in VLM_PLANTS])
def test_backward_only_plant_in_its_vlm_is_caught_where_it_is(plant, where, mode, vlm_causal_reference, vlm_clean):
    mp = pytest.MonkeyPatch()
    try:
        plant(mp, vlm_causal_reference.config)
        r = _against(vlm_causal_reference, *ALL_CAUSES)
    finally:
        mp.undo()
    _caught_backward_only(r, vlm_clean, where, mode)
