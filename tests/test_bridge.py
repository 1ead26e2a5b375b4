"""The HF <-> Megatron weight bridge: bit-exact round trips (in memory, through folders, sharded),
per-rank layouts, refusals, config round trips and folder validation. Fast, CPU only."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.bridge.convert import (
    BridgeError,
    config_roundtrip,
    hf_to_megatron,
    megatron_to_hf,
    pack_qkv,
    same_bits,
    shard,
    split_hf_state,
    unpack_qkv,
    unshard,
)
from parity.bridge.io import CheckpointError, expected_hf_shapes, inspect_folder, load_folder, save_folder
from parity.bridge.mapping import RULES
from parity.config import TextArgs, UnsupportedConfig, full_text_config_kwargs, make_text_config, text_config_kwargs
from parity.engine.randomize import randomize_

FEW = settings(max_examples=25, deadline=None)


def build(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import Gemma4ForCausalLM

    cfg = make_text_config(text_config_kwargs(**overrides))
    model = randomize_(Gemma4ForCausalLM(cfg), seed).to(dtype)
    return cfg, TextArgs.from_hf(cfg), model.state_dict()


def assert_bit_exact(got: dict, want: dict) -> None:
    assert set(got) == set(want), f"key sets differ: {sorted(set(got) ^ set(want))[:5]}"
    for key, t in want.items():
        assert got[key].shape == t.shape and got[key].dtype == t.dtype, key
        assert same_bits(got[key], t), key


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def tiny():
    return build(seed=0)


# ------------------------------------------------------------------------------------------------ round trips


def test_table_shapes_match_hf(tiny):
    cfg, args, state = tiny
    want = {k: tuple(v.shape) for k, v in state.items() if k != "lm_head.weight"}  # tied: not a tensor of its own
    assert expected_hf_shapes(args, "model.") == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_in_memory(dtype):
    cfg, args, state = build(seed=1, dtype=dtype)
    mc = hf_to_megatron(state, args)
    assert all(t.dtype == dtype for t in mc.values())
    assert_bit_exact(megatron_to_hf(mc, args, tied_lm_head=True), state)
    # the tied head is in memory only: the default export matches what HF writes to disk
    assert "lm_head.weight" not in megatron_to_hf(mc, args)


@pytest.mark.parametrize("overrides", [dict(enable_moe_block=False), dict(tie_word_embeddings=False),
                                       dict(attention_k_eq_v=False, num_global_key_value_heads=None)])
def test_roundtrip_variants(overrides):
    cfg, args, state = build(seed=2, **overrides)
    mc = hf_to_megatron(state, args)
    assert ("output_layer.weight" in mc) == (not args.tie_word_embeddings)
    assert any("moe." in k for k in mc) == args.enable_moe_block
    assert_bit_exact(megatron_to_hf(mc, args, tied_lm_head=True), state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_roundtrip_through_sharded_folder(tmp_path, dtype):
    from transformers import Gemma4ForCausalLM

    cfg, args, state = build(seed=3, dtype=dtype)
    save_folder(megatron_to_hf(hf_to_megatron(state, args), args), cfg, tmp_path, max_shard_bytes=100_000)
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*"))) > 3
    info = inspect_folder(tmp_path)
    assert info.architecture == "Gemma4ForCausalLM" and info.prefix == "model." and not info.other_keys
    assert info.total_bytes == sum(t.nbytes for k, t in state.items() if k != "lm_head.weight")
    loaded_cfg, loaded = load_folder(tmp_path)
    assert "lm_head.weight" not in loaded  # tied: not written
    back = megatron_to_hf(hf_to_megatron(loaded, TextArgs.from_hf(loaded_cfg)), args, tied_lm_head=True)
    assert_bit_exact(back, state)
    model, info = Gemma4ForCausalLM.from_pretrained(tmp_path, local_files_only=True, output_loading_info=True)
    assert not any(info.values())
    assert_bit_exact(model.state_dict(), state)


def test_inspect_accepts_hf_and_google_style_folders(tmp_path):
    """HF's own save_pretrained output (5.24 writes per_layer_config), and the same config written the way
    Google's files are (global_head_dim / num_global_key_value_heads instead of per_layer_config)."""
    from transformers import Gemma4ForCausalLM

    cfg, args, state = build(seed=6)
    model = Gemma4ForCausalLM(cfg)
    model.load_state_dict(state)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert inspect_folder(tmp_path).args == args
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("per_layer_config", None)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "global_head_dim": 32, "num_global_key_value_heads": 2}))
    loaded_cfg, loaded = load_folder(tmp_path)
    assert TextArgs.from_hf(loaded_cfg) == args
    on_disk = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert_bit_exact(megatron_to_hf(hf_to_megatron(loaded, args), args), on_disk)


def test_load_folder_casts(tmp_path, tiny):
    cfg, args, state = tiny
    save_folder(state, cfg, tmp_path)
    _, loaded = load_folder(tmp_path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    assert inspect_folder(tmp_path).bytes_as(torch.bfloat16) * 2 == inspect_folder(tmp_path).total_bytes


# ------------------------------------------------------------------------------------------------ sharding

LAYOUTS = [(2, 1, 2), (1, 2, 1), (2, 2, 2), (2, 2, 1), (1, 1, 2), (1, 2, 2)]  # (TP, EP, ETP)


def shards_of(state, args, tp, ep, etp):
    return {(t, e, x): hf_to_megatron(state, args, tp_rank=t, tp_size=tp, ep_rank=e, ep_size=ep,
                                      etp_rank=x, etp_size=etp)
            for t, e, x in itertools.product(range(tp), range(ep), range(etp))}


@pytest.mark.parametrize("tp,ep,etp", LAYOUTS)
def test_sharded_roundtrip(tiny, tp, ep, etp):
    cfg, args, state = tiny
    shards = shards_of(state, args, tp, ep, etp)
    assert_bit_exact(megatron_to_hf(shards, args, tied_lm_head=True), state)
    if etp in (tp, 1):  # megatron's usual worlds: ranks keyed (tp_rank, ep_rank), ETP inferred from shapes
        two = {(t, e): shards[(t, e, t if etp == tp else 0)] for t in range(tp) for e in range(ep)}
        assert_bit_exact(megatron_to_hf(two, args, tied_lm_head=True), state)


def test_rank_layout(tiny):
    """What each rank holds, spelled out independently of the converter (TP2 x EP2, ETP = TP)."""
    cfg, args, state = tiny
    H, I, E, Ie, V = args.hidden_size, args.intermediate_size, args.num_experts, args.moe_intermediate_size, args.vocab_size
    local = hf_to_megatron(state, args, tp_rank=1, tp_size=2, ep_rank=1, ep_size=2)
    p = "model.layers.2."  # a full K=V layer: np=8, ng=2, hn=32
    q = state[p + "self_attn.q_proj.weight"].view(8, 32, H)
    k = state[p + "self_attn.k_proj.weight"].view(2, 32, H)
    want_qkv = torch.cat([q[4:8].reshape(-1, H), k[1], k[1]])  # group 1: its 4 query heads, k_1, v_1 = k_1
    assert same_bits(local["decoder.layers.2.self_attention.linear_qkv.weight"], want_qkv)
    assert same_bits(local["decoder.layers.2.self_attention.linear_proj.weight"],
                     state[p + "self_attn.o_proj.weight"][:, 128:])
    gate, up = state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]
    assert same_bits(local["decoder.layers.2.mlp.linear_fc1.weight"], torch.cat([gate[I // 2:], up[I // 2:]]))
    gu = state[p + "experts.gate_up_proj"]
    want_fc1 = torch.cat([gu[E // 2:, Ie // 2:Ie], gu[E // 2:, Ie + Ie // 2:]], dim=1)
    assert same_bits(local["decoder.layers.2.moe.experts.linear_fc1.weight"], want_fc1)
    assert same_bits(local["decoder.layers.2.moe.experts.linear_fc2.weight"],
                     state[p + "experts.down_proj"][E // 2:, :, Ie // 2:])
    assert same_bits(local["embedding.word_embeddings.weight"], state["model.embed_tokens.weight"][V // 2:])
    assert same_bits(local["decoder.layers.2.moe.router.weight"], state[p + "router.proj.weight"])
    # a sliding layer: (ng/TP) * (np/ng + 2) * hn rows with np=8, ng=4, hn=16
    assert local["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 // 2) * (8 // 4 + 2) * 16, H)


def test_parallel_layout_refused(tiny):
    cfg, args, state = tiny
    with pytest.raises(BridgeError) as e:
        hf_to_megatron(state, args, tp_size=4, tp_rank=0)  # full layers have 2 KV heads
    assert "num_kv_heads 2 % TP 4" in one_line(e)


def test_replicas_must_agree(tiny):
    cfg, args, state = tiny
    shards = shards_of(state, args, 2, 1, 2)
    name = "decoder.layers.0.input_layernorm.weight"
    shards[(1, 0, 1)][name] = shards[(1, 0, 1)][name] + 1
    with pytest.raises(BridgeError, match="replicas of decoder.layers.0.input_layernorm.weight differ"):
        megatron_to_hf(shards, args)


def test_k_eq_v_export_refuses_v_not_k(tiny):
    cfg, args, state = tiny
    mc = hf_to_megatron(state, args)
    name = "decoder.layers.5.self_attention.linear_qkv.weight"
    qkv = mc[name].clone()
    qkv[-1, 0] += 1.0  # last row is in v of the last group
    with pytest.raises(BridgeError) as e:
        megatron_to_hf({**mc, name: qkv}, args)
    assert one_line(e).startswith(name) and "V rows differ from K rows" in str(e.value)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "tied_differs"])
def test_import_errors_name_the_key(tiny, case):
    cfg, args, state = tiny
    state = dict(state)
    key = "model.layers.1.self_attn.v_proj.weight"
    if case == "missing":
        del state[key]
    elif case == "unexpected":
        key = "model.layers.1.per_layer_input_gate.weight"
        state[key] = torch.zeros(1)
    elif case == "shape":
        state[key] = state[key][:-1]
    else:
        key = "lm_head.weight"
        state[key] = state[key] + 1
    with pytest.raises(BridgeError) as e:
        hf_to_megatron(state, args)
    assert key in one_line(e)


def test_export_refuses_unknown_megatron_tensor(tiny):
    cfg, args, state = tiny
    mc = hf_to_megatron(state, args)
    mc["decoder.layers.0.foo.weight"] = torch.zeros(1)
    mc["decoder.layers.0.mlp.linear_fc1._extra_state"] = None  # TE/megatron bookkeeping is ignored
    with pytest.raises(BridgeError, match="unexpected Megatron tensor decoder.layers.0.foo.weight"):
        megatron_to_hf(mc, args)


# ------------------------------------------------------------------------------------------------ properties


@st.composite
def qkv_shapes(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    ng = tp * draw(st.integers(1, 3))
    return draw(st.integers(1, 4)) * ng, ng, draw(st.sampled_from([2, 4, 8])), tp, draw(st.sampled_from([3, 8]))


@FEW
@given(qkv_shapes())
def test_qkv_pack_layout_and_roundtrip(shapes):
    nq, ng, hn, tp, H = shapes
    rep = nq // ng
    q, k, v = (torch.randn(n * hn, H) for n in (nq, ng, ng))
    s = dict(np=nq, ng=ng, hn=hn)
    full = pack_qkv(q, k, v, s)
    blocks = full.view(ng, rep + 2, hn, H)  # megatron: per group [rep query heads, k, v]
    for g in range(ng):
        assert torch.equal(blocks[g, :rep].reshape(-1, H), q.view(nq, hn, H)[g * rep:(g + 1) * rep].reshape(-1, H))
        assert torch.equal(blocks[g, rep], k.view(ng, hn, H)[g]) and torch.equal(blocks[g, rep + 1], v.view(ng, hn, H)[g])
    parts = [shard(full, 0, r, tp) for r in range(tp)]
    assert all(torch.equal(p, blocks[r * ng // tp:(r + 1) * ng // tp].reshape(-1, H)) for r, p in enumerate(parts))
    for a, b in zip(unpack_qkv(unshard(parts, 0), s), (q, k, v)):
        assert torch.equal(a, b)


@FEW
@given(st.sampled_from([1, 2, 4]), st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(1, 3))
def test_expert_stacking_roundtrip(ep, e_per_rank, etp, ie_per_rank):
    E, Ie, H = ep * e_per_rank, etp * ie_per_rank, 5
    fc1_rule, fc2_rule = (r for r in RULES if "moe.experts" in r.mcore)
    gate_up, down = torch.randn(E, 2 * Ie, H), torch.randn(E, H, Ie)
    for e, x in itertools.product(range(ep), range(etp)):
        experts = slice(e * e_per_rank, (e + 1) * e_per_rank)
        rows = slice(x * ie_per_rank, (x + 1) * ie_per_rank)
        local1 = shard(shard(gate_up, fc1_rule.ep, e, ep), fc1_rule.etp, x, etp, fc1_rule.gated)
        want1 = torch.cat([gate_up[experts, :Ie][:, rows], gate_up[experts, Ie:][:, rows]], dim=1)
        assert torch.equal(local1, want1)
        local2 = shard(shard(down, fc2_rule.ep, e, ep), fc2_rule.etp, x, etp, fc2_rule.gated)
        assert torch.equal(local2, down[experts][:, :, rows])
    for t, rule in ((gate_up, fc1_rule), (down, fc2_rule)):
        per_ep = [unshard([shard(shard(t, rule.ep, e, ep), rule.etp, x, etp, rule.gated) for x in range(etp)],
                          rule.etp, rule.gated) for e in range(ep)]
        assert torch.equal(unshard(per_ep, rule.ep), t)


@st.composite
def small_configs(draw):
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    layer_types = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=0, max_size=3))
    k_eq_v = draw(st.booleans())
    return dict(
        hidden_size=draw(st.sampled_from([48, 96])),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=draw(st.sampled_from([8, 16])),
        global_head_dim=draw(st.sampled_from([16, 32])),
        num_global_key_value_heads=(draw(st.sampled_from([1, kv])) if k_eq_v else None),
        attention_k_eq_v=k_eq_v,
        num_hidden_layers=len(layer_types) + 1,
        layer_types=layer_types + ["full_attention"],
        enable_moe_block=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
    )


@settings(max_examples=8, deadline=None)
@given(small_configs(), st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2)]))
def test_roundtrip_random_configs(overrides, layout):
    cfg, args, state = build(seed=4, **overrides)
    tp, ep = layout
    if any(l.num_kv_heads % tp for l in args.layers):
        tp = 1
    shards = {(t, e): hf_to_megatron(state, args, tp_rank=t, tp_size=tp, ep_rank=e, ep_size=ep)
              for t in range(tp) for e in range(ep)}
    assert_bit_exact(megatron_to_hf(shards, args, tied_lm_head=True), state)
    rebuilt, diffs = config_roundtrip(cfg)
    assert diffs == {}


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("kwargs", [
    text_config_kwargs(),
    full_text_config_kwargs(),  # 26B-A4B: config only, never the model
    text_config_kwargs(enable_moe_block=False, num_experts=None, top_k_experts=None, moe_intermediate_size=None),
    text_config_kwargs(tie_word_embeddings=False, final_logit_softcapping=None, use_bidirectional_attention="vision"),
    text_config_kwargs(layer_types=["full_attention"] * 2, num_hidden_layers=2),  # no sliding layer at all
])
def test_config_roundtrip(kwargs):
    cfg = make_text_config(kwargs)
    rebuilt, diffs = config_roundtrip(cfg)
    assert diffs == {}
    for i in range(cfg.num_hidden_layers):  # per-layer shapes, as HF resolves them
        a, b = cfg.per_layer_config[i], rebuilt.per_layer_config[i]
        assert (a.head_dim, a.num_key_value_heads) == (b.head_dim, b.num_key_value_heads)
    assert rebuilt.rope_parameters == cfg.rope_parameters


def test_config_roundtrip_26b_shape():
    cfg = make_text_config(full_text_config_kwargs())
    args = TextArgs.from_hf(cfg)
    full = [l for l in args.layers if not l.is_sliding]
    assert len(full) == 5 and all((l.head_dim, l.num_kv_heads, l.k_eq_v) == (512, 2, True) for l in full)
    assert all((l.head_dim, l.num_kv_heads) == (256, 8) for l in args.layers if l.is_sliding)
    assert config_roundtrip(cfg)[1] == {}


# ------------------------------------------------------------------------------------------------ folders


@pytest.fixture
def folder(tmp_path, tiny):
    cfg, args, state = tiny
    save_folder(state, cfg, tmp_path, max_shard_bytes=200_000)
    return tmp_path


def test_inspect_rejects_missing_shard(folder):
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError) as e:
        inspect_folder(folder)
    assert victim.name in one_line(e) and "missing shard" in str(e.value)


def test_inspect_rejects_missing_key(tmp_path, tiny):
    cfg, args, state = tiny
    key = "model.layers.3.router.per_expert_scale"
    save_folder({k: v for k, v in state.items() if k != key}, cfg, tmp_path)
    with pytest.raises(CheckpointError) as e:
        inspect_folder(tmp_path)
    assert f"missing tensor {key}" in one_line(e)


def test_inspect_rejects_wrong_shape(tmp_path, tiny):
    cfg, args, state = tiny
    key = "model.layers.2.self_attn.k_proj.weight"
    save_folder({**state, key: state[key][:32]}, cfg, tmp_path)
    with pytest.raises(CheckpointError) as e:
        inspect_folder(tmp_path)
    assert f"shape mismatch for {key}: file has [32, 96], config implies [64, 96]" in one_line(e)


def test_inspect_rejects_unexpected_key(tmp_path, tiny):
    cfg, args, state = tiny
    save_folder({**state, "model.layers.0.self_attn.v_norm.weight": torch.ones(16)}, cfg, tmp_path)
    with pytest.raises(CheckpointError) as e:
        inspect_folder(tmp_path)
    assert "unexpected tensor model.layers.0.self_attn.v_norm.weight" in one_line(e)


def test_inspect_refuses_an_unsupported_feature(folder):  # attention biases: not built on either side
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "attention_bias": True}))
    with pytest.raises(UnsupportedConfig) as e:
        inspect_folder(folder)
    assert "attention_bias=True" in one_line(e)


@pytest.mark.parametrize("content,match", [
    (None, "config.json: missing"),
    ("{not json", "does not parse as JSON"),
    (json.dumps({"model_type": "llama"}), "model_type 'llama' is not Gemma 4"),
    (json.dumps({"model_type": "gemma4"}), "without a text_config"),
])
def test_inspect_rejects_bad_config(folder, content, match):
    if content is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=match) as e:
        inspect_folder(folder)
    one_line(e)


# ------------------------------------------------------------------------------------------------ VLM


def test_vlm_text_part_and_leftovers(tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    from parity.vlm_config import make_vlm_config

    cfg = make_vlm_config()
    state = randomize_(Gemma4ForConditionalGeneration(cfg), 5).state_dict()
    args = TextArgs.from_hf(cfg)
    prefix, text, other = split_hf_state(state)
    assert prefix == "model.language_model." and other
    assert all(k.startswith(("model.vision_tower.", "model.embed_vision.")) for k in other)
    back = megatron_to_hf(hf_to_megatron(state, args), args, arch="Gemma4ForConditionalGeneration", tied_lm_head=True)
    assert_bit_exact({**back, **other}, state)
    assert config_roundtrip(cfg)[1] == {}

    save_folder({**megatron_to_hf(hf_to_megatron(state, args), args, arch="Gemma4ForConditionalGeneration"), **other},
                cfg, tmp_path, max_shard_bytes=300_000)
    info = inspect_folder(tmp_path)
    assert info.architecture == "Gemma4ForConditionalGeneration" and set(info.other_keys) == set(other)
    model, loading = Gemma4ForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True,
                                                                    output_loading_info=True)
    assert not any(loading.values())
    assert_bit_exact(model.state_dict(), state)


# ------------------------------------------------------------------------------------------------ a real world

_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from parity.bridge.convert import gather_from_world, hf_to_megatron, same_bits
    rank, store, data = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    state, args = torch.load(data, weights_only=False)
    # two ranks: attention TP2; experts EP2 x ETP1 over the same two ranks (a valid megatron layout)
    local = hf_to_megatron(state, args, tp_rank=rank, tp_size=2, ep_rank=rank, ep_size=2, etp_rank=0, etp_size=1)
    back = gather_from_world(local, args, ranks=(rank, rank, 0))
    want = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert set(back) == set(want) and all(same_bits(back[k], v) for k, v in want.items())
    dist.destroy_process_group()
""")


def test_gather_from_world(tmp_path, tiny):
    cfg, args, state = tiny
    torch.save((state, args), tmp_path / "data.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(tmp_path / "store"), str(tmp_path / "data.pt")],
                              env=env, stderr=subprocess.PIPE) for r in range(2)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors


# ------------------------------------------------------------------------------------------------ streaming

def test_streamed_import_and_export_match_the_dicts_and_check_first(tiny):
    from parity.bridge.convert import iter_hf_to_megatron, iter_megatron_to_hf

    cfg, args, state = tiny
    ranks = dict(tp_rank=1, tp_size=2, ep_rank=0, ep_size=2)
    streamed = list(iter_hf_to_megatron(state, args, **ranks))
    assert [k for k, _ in streamed] == list(hf_to_megatron(state, args, **ranks))  # one pass, table order
    assert_bit_exact(dict(streamed), hf_to_megatron(state, args, **ranks))
    # every key and shape is checked before the first tensor is produced
    broken = {k: v for k, v in state.items() if k != "model.layers.5.mlp.down_proj.weight"}
    with pytest.raises(BridgeError, match="missing HF tensor model.layers.5.mlp.down_proj.weight"):
        iter_hf_to_megatron(broken, args)
    mc = hf_to_megatron(state, args)
    pairs = list(iter_megatron_to_hf(mc, args))
    assert len({k for k, _ in pairs}) == len(pairs)  # each HF tensor once
    assert_bit_exact(dict(pairs), {k: v for k, v in state.items() if k != "lm_head.weight"})


def test_load_streamed_refuses_gaps_and_wrong_shapes(tiny):
    from parity.bridge.convert import iter_hf_to_megatron
    from parity.systems.ours import load_streamed
    from parity.models.text import Gemma4Model
    from parity import megatron_env

    cfg, args, state = tiny
    megatron_env.init()
    model = Gemma4Model(args, dtype=torch.float32, device="cpu")
    pairs = list(iter_hf_to_megatron(state, args))
    load_streamed(model, pairs)
    assert_bit_exact({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, dict(pairs))
    with pytest.raises(RuntimeError, match="missing"):
        load_streamed(model, pairs[:-1])
    name, t = pairs[0]
    with pytest.raises(RuntimeError, match=f"{name} \\(shape"):
        load_streamed(model, [(name, t[:-1])] + pairs[1:])
    with pytest.raises(RuntimeError, match="twice"):
        load_streamed(model, pairs + [pairs[0]])


def test_export_of_wanted_keys_reads_only_their_megatron_tensors(tiny):
    """``want`` (the isolated backward: one layer's gradients a batch): only the Megatron tensors with a wanted HF key
    are fetched and assembled, each bit-exact as in the whole export."""
    from parity.bridge.convert import iter_megatron_to_hf

    cfg, args, state = tiny
    mc = hf_to_megatron(state, args)
    whole = dict(iter_megatron_to_hf(mc, args, grads=True))
    read = []

    class Counting(dict):
        def __getitem__(self, k):
            read.append(k)
            return dict.__getitem__(self, k)

    wanted = {"model.layers.3.self_attn.q_proj.weight", "model.layers.3.experts.gate_up_proj"}
    got = dict(iter_megatron_to_hf(Counting(mc), args, grads=True, want=wanted.__contains__))
    assert wanted <= set(got) and {k.split(".layers.")[1].split(".")[0] for k in got} == {"3"}
    assert len(got) == 4  # the fused QKV gives q, k, v; the experts' gate_up one tensor
    assert_bit_exact(got, {k: whole[k] for k in got})
    assert sorted(set(read)) == ["decoder.layers.3.moe.experts.linear_fc1.weight",
                                 "decoder.layers.3.self_attention.linear_qkv.weight"]
