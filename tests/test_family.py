"""The Gemma 4 family beyond the 26B-A4B (issue 24). The tiny E2B / E4B / 31B cases themselves (both systems, fp32
and bf16) run as parity suites from ``cases/``; here: every planted error of a new feature (per-layer embeddings,
KV sharing, the double-wide MLP: ``tests/plants.py`` ``FAMILY_PLANTS``) fails at its exact module, KV sources
follow the config's layer types, the checkpoint path, TP=2, and Megatron-Bridge's finding 16."""
from __future__ import annotations

import pytest
import torch

from parity import config as C
from parity.cases import load_case
from parity.engine.launch import execute
from tests.gloo import free_port, join
from tests.plants import FAMILY_PLANTS, double_wide_mlp_off_by_one
from tests.test_plants import _explain

@pytest.mark.parametrize(("case", "plant"), [pytest.param(c, p, id=p.name) for c, ps in FAMILY_PLANTS.items()
                                             for p in ps])
def test_family_plant_fails_and_is_localised(case, plant, monkeypatch):
    plant.plant(monkeypatch, None)
    r = execute(load_case(case), device="cpu")
    assert r["passed"] is False, _explain(r)
    assert r["summary"]["first_divergence"] == plant.where, _explain(r)


def test_double_wide_mlp_at_the_wrong_layers_is_refused(monkeypatch):
    """Widths at the wrong layers cannot load HF's weights: the import refuses, naming the first tensor."""
    double_wide_mlp_off_by_one(monkeypatch)
    r = execute(load_case("gemma4-e2b-tiny"), device="cpu")
    assert r["passed"] is False
    failures = r["summary"]["failures"]
    assert failures and "model.layers.4.mlp.gate_proj.weight" in failures[0], failures


def test_kv_sources_follow_the_configs_layer_types():
    """KV-shared layers reuse the last earlier non-shared layer of their own type, read from ``layer_types`` (an
    irregular pattern too), as HF's ``kv_sharing_modes`` marks them."""
    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention",
             "sliding_attention", "full_attention"]
    cfg = C.make_text_config(C.e2b_tiny_config_kwargs(num_hidden_layers=7, layer_types=types, num_kv_shared_layers=3))
    args = C.TextArgs.from_hf(cfg)
    assert [la.kv_source for la in args.layers] == [None, None, None, None, 1, 3, 1]
    assert [la.kv_store for la in args.layers] == [False, True, False, True, False, False, False]
    modes = cfg.kv_sharing_modes
    assert [i for i, m in enumerate(modes) if m == "store"] == [1, 3]
    assert [la.intermediate_size for la in args.layers] == [64] * 4 + [128] * 3  # double-wide on the shared ones


def test_member_shapes():
    """The tiny members keep their member's structure (period, KV-sharing count, PLE, K=V, global KV heads)."""
    e2b = C.TextArgs.from_hf(C.make_text_config(C.e2b_tiny_config_kwargs()))
    assert [la.layer_type[0] for la in e2b.layers] == list("ssssfssssf")
    assert sum(la.kv_shared for la in e2b.layers) == 5 and e2b.per_layer_size == 8
    assert {la.num_kv_heads for la in e2b.layers} == {1} and not any(la.k_eq_v for la in e2b.layers)
    e4b = C.TextArgs.from_hf(C.make_text_config(C.e4b_tiny_config_kwargs()))
    assert sum(la.kv_shared for la in e4b.layers) == 5 and {la.intermediate_size for la in e4b.layers} == {96}
    g31 = C.TextArgs.from_hf(C.make_text_config(C.g31b_tiny_config_kwargs()))
    full = [la for la in g31.layers if not la.is_sliding]
    assert len(full) == 2 and all(la.k_eq_v and la.num_kv_heads == 1 for la in full)
    assert g31.per_layer_size == 0 and not any(la.kv_shared for la in g31.layers)


# ---------------------------------------------------------------------------------------------------
# Megatron-Bridge 0.6.2's dense provider on the family (second system)

def _bridge_ok():
    from parity import mbridge

    return mbridge.available()


def test_finding_16_kv_shared_layers_keep_dead_k_norm_and_export_it(monkeypatch):
    """Finding 16: on KV-shared layers its attention keeps the full fused linear_qkv (its mapping fills the K/V rows
    with zeros) and a k-norm its mapping never writes (HF has neither); its forward computes that K/V and drops it
    for the source layer's. Its export writes ``self_attn.k_norm.weight`` for each KV-shared layer: keys HF's
    checkpoint does not have."""
    ok, why = _bridge_ok()
    if not ok:
        pytest.skip(f"Megatron-Bridge not importable: {why}")
    from parity.systems.megatron_bridge import MegatronBridgeSystem

    seen = {}
    load = MegatronBridgeSystem.load

    def spy(self, hf_state, folder=None):
        load(self, hf_state, folder)
        att = self.bm.model.decoder.layers[5].self_attention
        hn, q = 16, 4 * 16
        seen.update(dead=list(self.unloaded_dead), kv_rows=att.linear_qkv.weight[q:q + 2 * hn].clone(),
                    q_rows_equal=torch.equal(att.linear_qkv.weight[:q], hf_state["model.layers.5.self_attn.q_proj.weight"]))
    monkeypatch.setattr(MegatronBridgeSystem, "load", spy)
    r = execute(load_case("gemma4-e2b-tiny"), device="cpu", system="megatron-bridge")
    assert seen["dead"] == [f"decoder.layers.{i}.self_attention.k_layernorm.weight" for i in range(5, 10)]
    assert bool((seen["kv_rows"] == 0).all()) and seen["q_rows_equal"]
    extra = sorted(x["name"] for x in r["roundtrip"]["rows"] if x.get("problem") == "unexpected key")
    assert extra == [f"model.layers.{i}.self_attn.k_norm.weight" for i in range(5, 10)]
    assert r["roundtrip"]["bit_exact"] == r["roundtrip"]["tensors"] - 5  # every tensor HF has: bit-exact
    assert r["checks"]["modules"] and r["checks"]["logits"]  # the dead k-norm (NaN here) never reaches an output


@pytest.mark.parametrize("builder", ["e2b_tiny"])  # E4B / 31B folders: the same path (run by hand: all pass)
def test_member_runs_from_a_checkpoint_folder(builder, tmp_path):
    """Each member through the checkpoint path (a sharded folder; for KV-shared layers with the K/V tensors a
    checkpoint may still carry there, which HF's loader and both imports skip): passes, round trip bit-exact."""
    from transformers import Gemma4ForCausalLM

    from parity.bridge.io import save_folder
    from parity.engine.randomize import randomize_

    cfg = C.make_text_config(C.TEXT_BUILDERS[builder]())
    model = Gemma4ForCausalLM(cfg)
    randomize_(model, seed=5)
    state = dict(model.state_dict())
    args = C.TextArgs.from_hf(cfg)
    shared = [i for i, la in enumerate(args.layers) if la.kv_shared]
    if shared:
        la = args.layers[shared[0]]
        state[f"model.layers.{shared[0]}.self_attn.k_proj.weight"] = torch.randn(la.num_kv_heads * la.head_dim,
                                                                                 args.hidden_size)
    save_folder(state, cfg, tmp_path / "ckpt", max_shard_bytes=200_000)
    r = execute(load_case("gemma4-checkpoint"), device="cpu", dtype="float32", checkpoint=str(tmp_path / "ckpt"))
    assert r["passed"] is True, _explain(r)
    rt = r["roundtrip"]
    assert rt["tensors"] == rt["bit_exact"] == len(model.state_dict()) - 1  # lm_head: tied to the embedding


def _tp2_worker(rank, world, port, q):
    import dataclasses

    join(rank, world, port)
    from parity.cases import ModelSpec, Parallel
    from parity.engine.pipeline import run

    case = load_case("gemma4-e4b-tiny")  # a gloo world of CPU processes (case files keep tp > 1 on CUDA)
    case = dataclasses.replace(case, name="e4b-tiny-tp2", model=ModelSpec(builder="e4b_tiny"), parallel=Parallel(tp=2))
    r = run(case, device="cpu")
    if rank == 0:
        q.put({"passed": r["passed"], "first": r["summary"]["first_divergence"], "rt": r["roundtrip"],
               "logits_rel_l2": r["summary"]["logits"]["rel_l2"]})


def test_e4b_at_tp2_matches_hf_and_exports_bit_exact():
    """PLE (vocab-parallel table, column-parallel projection and gates, row-parallel per-layer projections) and the
    KV-shared layers' Q-only column-parallel projection (each rank its heads, reading its heads of the source's
    K/V) in a 2-process gloo world: every row within fp32 round-off, the export gathered from both ranks."""
    import torch.multiprocessing as mp

    q = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_tp2_worker, args=(2, free_port(), q), nprocs=2)
    r = q.get()
    assert r["passed"] and r["first"] is None, r
    assert r["logits_rel_l2"] <= 1e-6
    assert r["rt"]["tensors"] == r["rt"]["bit_exact"] == 194


def test_kv_sharing_without_ple_is_refused_in_one_line():
    """HF's own forward cannot run it (it slices the per-layer inputs it does not have): refused, not a crash."""
    with pytest.raises(C.UnsupportedConfig, match="KV sharing without per-layer embeddings"):
        C.check_supported(C.make_text_config(C.e2b_tiny_config_kwargs(hidden_size_per_layer_input=0)))


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize(("case", "ple_rows"), [("gemma4-e2b-vlm-tiny", 66), ("gemma4-e4b-vlm-tiny", 78)])
def test_per_layer_embeddings_inside_the_vlm_hold_on_more_seeds(case, ple_rows, seed):
    """E2B and E4B as they ship are VLMs with per-layer embeddings, KV sharing and the audio tower: PLE looks up the
    placeholders' rows as the pad token's and projects the merged embeddings (images and audio in them), as HF's
    Gemma4Model passes them on. Seed 0 runs as a parity suite; here seeds 1-3: every row (the PLE rows end to end
    and alone among them) within the fp32 gate (clean: worst 2.5e-6 E2B, 1.2e-6 E4B at seed 0)."""
    r = execute(load_case(case), device="cpu", seed=seed)
    assert r["passed"] is True, _explain(r)
    ple = [m for m in r["modules"] if "per_layer" in m["name"] and m["mode"] in ("end_to_end", "isolated")]
    assert len(ple) == ple_rows and max(m["rel_l2"] for m in ple) < 1e-5
    assert sum(1 for m in r["modules"] if ".audio_tower." in m["name"]) > 0


def _hf_grads(model, ids: torch.Tensor, checkpointing: dict | None) -> dict[str, torch.Tensor]:
    """HF's own training step's parameter gradients (its loss on next-token labels), with activation checkpointing
    (``checkpointing``: its kwargs; ``{}``: HF's default) or without (None)."""
    model.train()
    if checkpointing is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing or None)
    model.zero_grad()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("builder", ["e2b_tiny", "e4b_tiny"])
def test_hf_activation_checkpointing_and_kv_sharing(builder):
    """KV sharing during training, as HF does it without a cache (issue 24): the KV-shared layers read their source
    layers' K/V from a dict the decoder passes along. HF's activation checkpointing as it ships (non-reentrant, its
    default) gives the gradients of the run without it. With ``use_reentrant=True`` (a setting training scripts pass)
    the source layers' K/V projections and every parameter upstream of them get other gradients (measured rel-L2
    0.04-1.08; the layers after the last source keep theirs exactly): reentrant checkpointing runs each layer's forward
    without autograd, so the K/V the shared layers read carry no graph back to their source layers -- HF's training of
    E2B / E4B is then wrong, silently (the same model without KV sharing, and the 31B, keep their gradients). The
    reference here trains without checkpointing."""
    from transformers import Gemma4ForCausalLM

    from parity.engine.randomize import randomize_

    config = C.make_text_config(C.TEXT_BUILDERS[builder]())
    model = Gemma4ForCausalLM._from_config(config, dtype=torch.float32)
    randomize_(model, seed=0)
    ids = torch.randint(10, 200, (2, 40), generator=torch.Generator().manual_seed(0))

    def rel(a: dict, b: dict) -> dict[str, float]:
        return {k: float((a[k] - b[k]).norm() / a[k].norm()) for k in a}

    plain = _hf_grads(model, ids, None)
    default = _hf_grads(model, ids, {})
    reentrant = _hf_grads(model, ids, {"use_reentrant": True})
    assert default.keys() == plain.keys() and max(rel(plain, default).values()) < 1e-6
    off = rel(plain, reentrant)
    sources = {s for s in C.kv_sources(config) if s is not None}
    assert all(off[f"model.layers.{s}.self_attn.{p}_proj.weight"] > 0.1 for s in sources for p in ("k", "v")), off
    assert off["model.embed_tokens.weight"] > 0.1 and off["model.layers.0.self_attn.q_proj.weight"] > 0.1
    after = [v for k, v in off.items() if ".layers." in k and int(k.split(".")[2]) > max(sources)]
    assert after and max(after) == 0.0  # what lies downstream of every source layer keeps its gradient
    without_sharing = C.make_text_config(C.TEXT_BUILDERS[builder](num_kv_shared_layers=0))
    model = Gemma4ForCausalLM._from_config(without_sharing, dtype=torch.float32)
    randomize_(model, seed=0)
    assert max(rel(_hf_grads(model, ids, None), _hf_grads(model, ids, {"use_reentrant": True})).values()) < 1e-6
