"""System ``parity``: this project's Megatron-core Gemma 4 (``parity.models``) with its bridge (``parity.bridge``).

Its module names per alignment row (``NAMES``), the layout conversions of its outputs (``[s, b, ...]``,
fused QKV and [gate; up] split by ``Part``, tensor-parallel shards gathered: ``megatron_layout``) and the
isolated replay of each module on HF's captured inputs with its *own* masks and RoPE tables, one handler per
row kind (``_OUTPUT``, ``_REPLAY``).
"""
from __future__ import annotations

from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

from parity import megatron_env
from parity.config import TextArgs
from parity.engine import adapters as A
from parity.engine.alignment import Aligned, Kind, Stack
from parity.engine.compare import value
from parity.engine.system import call_arg, hf_routing
from parity.megatron_layout import (finalize_grads, first, gather_heads, grad_norm, hf_token_order, input_to_hf, sb,
                                    several_ranks, split_heads, to_hf, tp_gather, tp_size, tp_split, train_layers)

# Alignment-table key -> module path in the text model (``language_model.`` inside the VLM).
LM = {
    "embed_tokens": "embedding", "norm": "decoder.final_layernorm", "lm_head": "output_layer",
    "embed_tokens_per_layer": "per_layer_embedding", "per_layer_model_projection": "per_layer_model_projection",
    "per_layer_projection_norm": "per_layer_projection_norm",
    "layers.{i}.self_attn.q_proj (kv shared)": "decoder.layers.{i}.self_attention.linear_q",
    **{f"layers.{{i}}{hf}": f"decoder.layers.{{i}}{mc}" for hf, mc in (
        ("", ""), (".input_layernorm", ".input_layernorm"), (".self_attn", ".self_attention"),
        *((f".self_attn.{p}_proj", ".self_attention.linear_qkv") for p in "qkv"),
        (".self_attn.q_norm", ".self_attention.q_layernorm"), (".self_attn.k_norm", ".self_attention.k_layernorm"),
        (".self_attn.o_proj", ".self_attention.linear_proj"),
        (".post_attention_layernorm", ".post_attention_layernorm"), (".pre_feedforward_layernorm", ".pre_mlp_layernorm"),
        (".mlp", ".mlp"), (".mlp.gate_proj", ".mlp.linear_fc1"), (".mlp.up_proj", ".mlp.linear_fc1"),
        (".mlp.down_proj", ".mlp.linear_fc2"), (".post_feedforward_layernorm_1", ".post_mlp_layernorm_1"),
        (".router", ".moe.router"), (".pre_feedforward_layernorm_2", ".pre_moe_layernorm"), (".experts", ".moe"),
        (".post_feedforward_layernorm_2", ".post_moe_layernorm"), (".post_feedforward_layernorm", ".post_mlp_layernorm"),
        *((f".{p}", f".{p}") for p in ("per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm")))},
}
_L, _M = "vision_tower.encoder.layers.{i}", "vision.vision_model.encoder.layers.{i}"
_LINEARS = {"self_attn.q_proj": "self_attention.linear_q", "self_attn.k_proj": "self_attention.linear_k",
            "self_attn.v_proj": "self_attention.linear_v", "self_attn.o_proj": "self_attention.linear_proj",
            "mlp.gate_proj": "mlp.linear_fc1_gate", "mlp.up_proj": "mlp.linear_fc1_up", "mlp.down_proj": "mlp.linear_fc2"}
VISION = {
    "vision_tower": "vision.vision_model", "vision_tower.patch_embedder": "vision.vision_model.patch_embedder",
    "vision_tower.patch_embedder.input_proj": "vision.vision_model.patch_embedder.input_proj",
    "vision_tower.encoder": "vision.vision_model.encoder",
    "vision_tower.encoder.rotary_emb": "vision.vision_model.encoder.rotary_emb",
    **{f"{_L}{hf}": f"{_M}{mc}" for hf, mc in (
        ("", ""), (".input_layernorm", ".input_layernorm"), (".self_attn", ".self_attention"),
        *((f".{hf}", f".{mc}") for hf, mc in _LINEARS.items()), *((f".{hf}.linear", f".{mc}.linear")
                                                                  for hf, mc in _LINEARS.items()),
        (".self_attn.q_norm", ".self_attention.q_layernorm"), (".self_attn.k_norm", ".self_attention.k_layernorm"),
        (".self_attn.v_norm", ".self_attention.v_layernorm"),
        (".post_attention_layernorm", ".post_attention_layernorm"), (".pre_feedforward_layernorm", ".pre_mlp_layernorm"),
        (".mlp", ".mlp"), (".mlp.act_fn", ".mlp.activation_func"), (".post_feedforward_layernorm", ".post_mlp_layernorm"))},
    "vision_tower.pooler": "vision.vision_model.pooler", "embed_vision": "vision.embed_vision",
    "embed_vision.embedding_pre_projection_norm": "vision.embed_vision.pre_projection_norm",
    "embed_vision.embedding_projection": "vision.embed_vision.linear_proj",
    "merged_embeddings": "image_scatter", "vision_masks": "vision.masks[encoder]",
}
_AL, _AM = "audio_tower.layers.{i}", "audio.audio_model.layers.{i}"
_AUDIO_LINEARS = {  # HF clippable linear -> ours, under a conformer layer (each has its bare ``.linear``)
    **{f"feed_forward{f}.{hf}": f"feed_forward{f}.{mc}" for f in (1, 2)
       for hf, mc in (("ffw_layer_1", "linear_fc1"), ("ffw_layer_2", "linear_fc2"))},
    "self_attn.q_proj": "self_attention.linear_q", "self_attn.k_proj": "self_attention.linear_k",
    "self_attn.v_proj": "self_attention.linear_v", "self_attn.post": "self_attention.linear_proj",
    "lconv1d.linear_start": "lconv.linear_start", "lconv1d.linear_end": "lconv.linear_end"}
_SUB, _SUBM = "audio_tower.subsample_conv_projection", "audio.audio_model.subsample"
AUDIO = {
    "audio_tower": "audio.audio_model", _SUB: _SUBM,
    **{f"{_SUB}.layer{j}{p}": f"{_SUBM}.layer{j}{p}" for j in (0, 1) for p in ("", ".conv", ".norm")},
    f"{_SUB}.input_proj_linear": f"{_SUBM}.input_proj", "audio_tower.rel_pos_enc": "audio.audio_model.rel_pos",
    **{f"{_AL}{hf}": f"{_AM}{mc}" for hf, mc in (
        ("", ""), *((f".{hf}", f".{mc}") for hf, mc in _AUDIO_LINEARS.items()),
        *((f".{hf}.linear", f".{mc}.linear") for hf, mc in _AUDIO_LINEARS.items()),
        *((f".feed_forward{f}{hf}", f".feed_forward{f}{mc}") for f in (1, 2) for hf, mc in (
            ("", ""), (".pre_layer_norm", ".pre_norm"), (".post_layer_norm", ".post_norm"))),
        (".norm_pre_attn", ".pre_attn_norm"), (".self_attn", ".self_attention"),
        (".self_attn.relative_k_proj", ".self_attention.linear_pos"), (".norm_post_attn", ".post_attn_norm"),
        (".lconv1d", ".lconv"), (".lconv1d.pre_layer_norm", ".lconv.pre_norm"),
        (".lconv1d.depthwise_conv1d", ".lconv.depthwise_conv"), (".lconv1d.conv_norm", ".lconv.conv_norm"),
        (".norm_out", ".out_norm"))},
    "audio_tower.output_proj": "audio.audio_model.output_proj", "embed_audio": "audio.embed_audio",
    "embed_audio.embedding_pre_projection_norm": "audio.embed_audio.pre_projection_norm",
    "embed_audio.embedding_projection": "audio.embed_audio.linear_proj",
    "merged_embeddings": "audio_scatter",  # with an audio tower the merge ends with the audio scatter
    "audio_masks": "audio.masks[blocked]",
}
TABLES = {"logits": "logits", "rotary_emb": "rotary_tables[{layer_type}]", "masks": "masks[{layer_type}]"}
TEXT_MC, VISION_MC, AUDIO_MC = "language_model.", "vision.", "audio."


def _vision_from_ranks(sd: dict) -> dict:
    """The vision tower's tensors of a state dict (or of gradients), its own names under the tower, whole: at TP > 1
    each TP-split tensor (``parity.bridge.vision.tp_dim``) all-gathered over the TP ranks, in rank order."""
    from parity.bridge import vision

    out = {k[len(VISION_MC):]: v for k, v in sd.items() if k.startswith(VISION_MC)}
    n = tp_size()
    if n == 1:
        return out
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shards = [{} for _ in range(n)]  # every rank's slices, then joined as the loader split them (gather_vision)
    for k, v in out.items():
        parts = [v] * n
        if vision.tp_dim(k) is not None:
            parts = [torch.empty_like(v) for _ in range(n)]
            torch.distributed.all_gather(parts, v.contiguous(), group=group)
        for shard, part in zip(shards, parts):
            shard[k] = part
    return vision.gather_vision(shards)


# How the module of a vision-layer row (``vision_tower.encoder.layers.{i}`` + suffix) splits over TP in our tower
# (``parity.models.vision``): "output" -- a column-parallel linear's features (its input whole); "input" -- a
# row-parallel linear reads its slice of the features (its output all-reduced, whole); "heads" -- a per-head norm on
# this rank's heads ``[n, N, heads, d]``, value and input; "features" -- the MLP's activation between them, value and
# input. Every other vision row is whole (the patch and soft-token embedders' linears gather their outputs).
_VISION_TP = {
    **{f".{p}{lin}": "output" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                        "mlp.up_proj") for lin in ("", ".linear")},
    **{f".{p}{lin}": "input" for p in ("self_attn.o_proj", "mlp.down_proj") for lin in ("", ".linear")},
    **{f".self_attn.{n}": "heads" for n in ("q_norm", "k_norm", "v_norm")},
    ".mlp.act_fn": "features",
}


def _vision_split(a: Aligned) -> str | None:
    """What of vision row ``a``'s module is this rank's part at TP > 1 (``_VISION_TP``), or None (whole)."""
    if tp_size() == 1 or not a.row.hf.startswith(_L):
        return None
    return _VISION_TP.get(a.row.hf[len(_L):])


def _vision_whole(a: Aligned, x: Any, io: str) -> Any:
    """Our vision module's output (``io="output"``) or input (``"input"``) -- or a gradient with respect to either,
    laid out as the value -- whole: features or heads gathered over TP where this rank holds a part of them."""
    split = _vision_split(a)
    if split == "heads":
        return gather_heads(x)
    return tp_gather(x) if split in (io, "features") else x


def _main_input(call) -> torch.Tensor:
    if call.args:
        return call.args[0]
    for key in ("hidden_states", "inputs_embeds", "pixel_values", "x", "input"):
        if key in call.kwargs:
            return call.kwargs[key]
    raise ValueError("no tensor input captured")


def load_streamed(model, pairs) -> None:
    """Copy converted tensors into ``model`` as they come (no second full state dict in memory); every
    state-dict entry but ``_extra_state`` must be covered exactly once, with its shape."""
    targets = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    loaded: set[str] = set()
    with torch.no_grad():
        for name, t in pairs:
            dst = targets.get(name)
            if dst is None:
                raise RuntimeError(f"bridge/model mismatch: {name} (unexpected)")
            if name in loaded:
                raise RuntimeError(f"bridge/model mismatch: {name} (twice)")
            if tuple(dst.shape) != tuple(t.shape):
                raise RuntimeError(f"bridge/model mismatch: {name} (shape {tuple(t.shape)} vs {tuple(dst.shape)})")
            dst.copy_(t)
            loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise RuntimeError(f"bridge/model mismatch: missing {missing[:3]}")


def _version() -> str:
    try:
        return version("gemma4-parity")
    except PackageNotFoundError:  # pragma: no cover - a checkout without an install
        return "unknown"


class ParitySystem:
    name, version = "parity", _version()
    loss_description = ("megatron-core vocab_parallel_cross_entropy of the next token, mean over the positions "
                        "with a label (Megatron-LM's masked mean)")
    optimizer_description = ("torch.optim.AdamW, matrices decayed, 1-D parameters not, global-norm clipping; bf16 "
                             "parameters with fp32 main weights in the optimizer: megatron-core's optimizer at "
                             "data-parallel size 1 (Float16OptimizerWithFloat16Params in bf16) equals it (its DDP + "
                             "get_megatron_optimizer need CUDA); K=V layers' V rows re-tied to K after each step")
    substituted: list[dict] = []  # nothing: plain megatron-core parts run everywhere
    shared = frozenset()
    replays: dict = {}  # every row replays on its own module and its own HF inputs

    # -- building and weights ----------------------------------------------------------------------

    def build(self, kind: str, hf_config: Any, *, dtype: torch.dtype, device: str) -> None:
        from parity.models import text, vlm

        self.vlm, self.dtype, self.device = kind == "vlm", dtype, device
        if self.vlm:
            self.model = vlm.Gemma4VLModel.from_hf_config(hf_config, dtype=dtype, device=device).eval()
            self.lm, self.args = self.model.language_model, self.model.text_args
        else:
            self.args = TextArgs.from_hf(hf_config)
            self.model = self.lm = text.Gemma4Model(self.args, dtype=dtype, device=device).eval()
        prefix = TEXT_MC if self.vlm else ""
        self.audio = self.vlm and self.model.audio_args is not None
        self.names = {**{k: prefix + v for k, v in LM.items()}, **TABLES, **(VISION if self.vlm else {}),
                      **(AUDIO if self.audio else {})}
        self._modules = dict(self.model.named_modules())

    def load(self, hf_state, folder=None) -> None:  # our import is parity.bridge.io's: ``hf_state`` is its output
        from parity.bridge import audio, convert, vision

        rk = megatron_env.ranks()
        ranks = dict(tp_rank=rk["tp_rank"], tp_size=rk["tp_size"], ep_rank=rk["ep_rank"], ep_size=rk["ep_size"],
                     etp_rank=rk["etp_rank"], etp_size=rk["etp_size"])
        if self.vlm:  # HF VLM state dict -> text (this rank's shards), vision and audio bridges, every key accounted for
            state = {TEXT_MC + k: v for k, v in convert.hf_to_megatron(hf_state, self.args, **ranks).items()}
            tower = vision.shard_vision(vision.hf_to_megatron_vision(hf_state, "model."), rk["tp_rank"], rk["tp_size"])
            state.update({VISION_MC + k: v for k, v in tower.items()})  # this TP rank's slices
            if self.audio:
                state.update({AUDIO_MC + k: v for k, v in audio.hf_to_megatron_audio(hf_state, "model.").items()})
            return load_streamed(self.model, state.items())
        load_streamed(self.model, convert.iter_hf_to_megatron(
            hf_state, self.args, **ranks, device=self.device if self.device == "cuda" else None))

    def export(self):
        """HF (key, tensor) pairs, one at a time; in a world of several ranks each tensor's shards are gathered."""
        yield from self._export(self._state())

    def _export(self, sd: dict):
        """A Megatron state dict (its own names) -> HF (key, tensor) pairs."""
        from parity.bridge import audio, convert, vision

        if not self.vlm:
            world = several_ranks()
            yield from (convert.iter_gather_from_world if world else convert.iter_megatron_to_hf)(sd, self.args)
            return
        text = {k[len(TEXT_MC):]: v for k, v in sd.items() if k.startswith(TEXT_MC)}
        if several_ranks():  # the text model's shards gathered (the vision tower's: _vision_from_ranks)
            yield from convert.iter_gather_from_world(text, self.args, arch="Gemma4ForConditionalGeneration")
        else:
            yield from convert.megatron_to_hf(text, self.args, arch="Gemma4ForConditionalGeneration").items()
        yield from vision.megatron_to_hf_vision(_vision_from_ranks(sd), "model.").items()
        if self.audio:
            yield from audio.megatron_to_hf_audio({k[len(AUDIO_MC):]: v for k, v in sd.items()
                                                   if k.startswith(AUDIO_MC)}, "model.").items()
        for k in sd:  # nothing else should carry weights; surfaces as "unexpected key" in the round trip
            if not k.startswith((TEXT_MC, VISION_MC) + ((AUDIO_MC,) if self.audio else ())):
                yield f"<megatron>{k}", sd[k]

    # -- LoRA --------------------------------------------------------------------------------------

    lora = None  # the LoRA transform once ``load_adapters`` has put adapters on

    def load_adapters(self, state, spec) -> None:
        """Megatron-Bridge's LoRA transform (``megatron.bridge.peft.lora.LoRA``: the same as that system's, on our
        megatron-core linears, which it reads natively) on the decoder's linears the case names, then HF's adapters
        through our weight mapping's rules (``parity.bridge.adapters``); at TP > 1 each rank its shards of them (its
        exports and gradients gather them back)."""
        from parity import mbridge, registry
        from parity.bridge import adapters as BA

        if spec.experts:
            raise NotImplementedError(registry.REFUSES["parity"]["lora.experts"])
        ok, why = mbridge.available()
        if not ok:
            raise NotImplementedError(f"LoRA in system parity is Megatron-Bridge's LoRA transform: {why}")
        from parity.mbridge import lora as L  # noqa: F401  (the bridge imported, its patches applied)
        from megatron.bridge.peft.lora import LoRA

        self.lora = LoRA(target_modules=_lora_targets(spec, self._mc_prefix()), dim=spec.r, alpha=spec.alpha,
                         dropout=spec.dropout)
        self.lora(self.model, training=True)
        self.model.eval()
        self.lora_scale = spec.alpha / spec.r
        if self.dtype != torch.float32:
            for _, wrapper in self._lora_wrappers():
                _fp32_adapter(wrapper)
        weights = BA.hf_to_megatron(state, self.args, self._hf_prefix())
        params = dict(self.model.named_parameters())
        rk = megatron_env.ranks()
        with torch.no_grad():  # at TP > 1 each rank its shards (``parity.bridge.adapters.shard``)
            for k, v in weights.items():
                p = params[self._mc_prefix() + k]
                p.copy_(BA.shard(k, v, p, rk["tp_rank"], rk["tp_size"]))
        self._modules = dict(self.model.named_modules())
        self._modules.update({n.replace(".to_wrap.", "."): m for n, m in list(self._modules.items())
                              if ".to_wrap." in n and n.replace(".to_wrap.", ".") not in self._modules})
        from parity.mbridge import substitutes as S

        self.substituted = [dict(row) for row in S.LORA]  # its LoRA layers' module, imported without TE

    def save_adapters(self, folder: str) -> None:
        """Its adapter export: a peft adapter folder (``adapter_model.safetensors`` + peft's ``LoraConfig``, its
        targets the adapted HF modules by full path)."""
        import os

        from peft import LoraConfig
        from safetensors.torch import save_file

        from parity.bridge import adapters as BA

        sd = {k: v.detach() for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
        tensors = {A.FILE_PREFIX + k: v.detach().cpu().clone()  # one file entry each (a shared A is written per part)
                   for k, v in BA.megatron_to_hf(self._whole_adapters(sd), self.args, self._hf_prefix())}
        modules = sorted({A.module_key(k) for k in tensors})
        LoraConfig(r=self.lora.dim, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                   target_modules=modules).save_pretrained(folder)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))

    def parked(self):
        """Its weights on the host for the block (``parity.tensors.parked``)."""
        from parity.tensors import parked

        return parked(self.model)

    def merged(self):
        """Its weights with each adapter merged (``W + alpha/r B A`` in Megatron layout), exported by its mapping."""
        from parity.bridge import adapters as BA

        sd = {k: v.detach() for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
        rk = megatron_env.ranks()
        base = {k.replace(".to_wrap.", "."): p for k, p in self.model.named_parameters()}
        yield from self._export(BA.merged(self._state(), {self._mc_prefix() + k: v
                                                          for k, v in self._whole_adapters(sd).items()},
                                          self.lora_scale, base, rk["tp_rank"], rk["tp_size"]))

    def _lora_wrappers(self):
        from megatron.bridge.peft.adapter_wrapper import AdapterWrapper

        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, AdapterWrapper)]

    def _state(self) -> dict:
        """Its base weights under their own names (LoRA's wrapped linears unwrapped, adapters left out)."""
        sd = {k: v for k, v in self.model.state_dict().items() if v is not None and not k.endswith("_extra_state")}
        return {k.replace(".to_wrap.", "."): v for k, v in sd.items() if ".adapter." not in k}

    def _adapters(self, sd: dict) -> dict:
        """Adapter tensors of a state dict (or of gradients), keyed under the text model."""
        mc = self._mc_prefix()
        return {k[len(mc):]: v for k, v in sd.items() if ".adapter." in k and k.startswith(mc)}

    def _whole_adapters(self, sd: dict) -> dict:
        """``_adapters`` with every TP rank's shards put together (``parity.bridge.adapters.gather``)."""
        from parity.bridge import adapters as BA

        mc = self._mc_prefix()
        params = {k[len(mc):]: p for k, p in self.model.named_parameters() if ".adapter." in k and k.startswith(mc)}
        return BA.gather(self._adapters(sd), params)

    def _mc_prefix(self) -> str:
        return TEXT_MC if self.vlm else ""

    def _hf_prefix(self) -> str:
        return "model.language_model." if self.vlm else "model."

    # -- running -----------------------------------------------------------------------------------

    def prepare(self, inputs: dict) -> None:
        """Its own masks and RoPE tables from the raw inputs (and the vision tower's, from image positions)."""
        self.inputs = inputs
        b, s = inputs["input_ids"].shape
        self.b, self.s = b, s
        self.masks = self.lm.build_masks(b, s, inputs["attention_mask"], inputs.get("mm_token_type_ids"), self.device)
        self.rope = self.lm.rotary_tables(inputs["position_ids"])
        self.layer_types = [la.layer_type for la in self.args.layers]
        if self.vlm:
            pos = self.positions = inputs["image_position_ids"]
            self.padding = (pos == -1).all(dim=-1)
            with torch.no_grad():
                self.vcos, self.vsin = self.model.vision.vision_model.encoder.rotary_emb(
                    torch.empty(0, dtype=self.dtype, device=pos.device), pos)
            self.vmask = (~self.padding)[:, None, None, :]
        if self.audio and "input_features_mask" in inputs:  # its own frame masks, relative positions, blocked mask
            from parity.models.audio import blocked_attention_mask

            tower = self.model.audio.audio_model
            self.amasks = tower.subsample.masks(inputs["input_features_mask"].bool())
            with torch.no_grad():
                self.apos = tower.rel_pos(torch.empty(0, dtype=self.dtype, device=self.device))
            self.amask = blocked_attention_mask(self.amasks[-1], self.model.audio_args)

    def forward(self, inputs: dict) -> torch.Tensor:
        if self.vlm:
            keys = ("input_ids", "pixel_values", "image_position_ids", "attention_mask", "position_ids",
                    "mm_token_type_ids") + (("input_features", "input_features_mask") if self.audio else ())
            return self.model(**{k: inputs[k] for k in keys})
        return self.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                          padding_mask=inputs["attention_mask"])

    def module(self, name: str) -> nn.Module | None:
        return self._modules.get(name)

    # -- training ----------------------------------------------------------------------------------

    def train_loss(self, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Its training path as Megatron-LM runs it: the model's logits, megatron-core's vocab-parallel cross
        entropy of the next token (on this rank's vocabulary slice), the mean over the positions that carry a label.
        ``labels``: HF's convention (input ids, -100 for none); shifted here. Returns (loss, logits [b, s, V]): the
        logits whole (gathered over TP; the loss reads this rank's slice of them, an exact split whose backward
        gathers the slices' gradients, so the logits' gradient is observable whole)."""
        self.zero_grad()
        logits = self.forward(inputs)
        return self.loss_on(logits, labels), logits

    def loss_on(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Its loss function alone on logits ``[b, s, V]`` (the isolated backward gives it HF's)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        from megatron.core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region

        target = torch.roll(labels, -1, dims=1)
        target[:, -1] = -100
        mask = target != -100
        # it exponentiates its logits input in place: a copy, so the logits stay what the model returned
        shard = scatter_to_tensor_model_parallel_region(sb(logits, contiguous=True)).clone()
        per = vocab_parallel_cross_entropy(shard, sb(target.clamp_min(0), contiguous=True))
        per = per.transpose(0, 1)
        return (per * mask).sum() / mask.sum()

    def zero_grad(self) -> None:
        """Its parameters' gradients cleared: a new backward begins (``finalize_grads`` pending again)."""
        self.model.zero_grad(set_to_none=True)
        self._finalized = False

    def finalize_grads(self) -> None:
        """megatron-core's ``finalize_model_grads`` (``megatron_layout.finalize_grads``), once per backward."""
        if getattr(self, "_finalized", True):
            return
        self._finalized = True
        finalize_grads(self.model, self.lm.config, self._experts())  # a VLM's towers too, as megatron finalizes a chunk

    def _experts(self) -> set[int]:
        from parity.models.text import Gemma4Experts

        return {id(p) for m in self.model.modules() if isinstance(m, Gemma4Experts) for p in m.parameters()}

    def optimizer_step(self, spec) -> float:
        """One step of its optimizer (made at the first call from the case's ``train.optimizer``): megatron's
        finalized gradients, AdamW with global-norm clipping (bf16 parameters: fp32 main weights in the optimizer,
        megatron's mixed precision), the gradients cleared, and the K=V layers' V rows re-tied to K (unused copies
        of K, kept for the fused layout, so the export stays exact; in the main copy too; with LoRA on, the rows of
        linear_qkv's adapter B). Only what trains is stepped (LoRA: the adapters). Returns the gradient norm before
        clipping."""
        from parity.engine.modes.step import AdamWStep

        if getattr(self, "_optimizer", None) is None:
            world = several_ranks()
            trains = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]  # LoRA: the adapters
            self._optimizer = AdamWStep(trains, spec, norm=self._grad_norm if world else None)
        self.finalize_grads()
        norm = self._optimizer.step()
        with torch.no_grad():
            for layer in self.lm.decoder.layers:
                if layer.layer_args.k_eq_v and not layer.layer_args.kv_shared:  # a shared layer has Q rows only
                    att = layer.self_attention
                    hn, ng = att.hidden_size_per_attention_head, att.num_query_groups_per_partition
                    rep = att.num_attention_heads_per_partition // ng
                    adapter = getattr(att.linear_qkv, "adapter", None)  # LoRA: its B's rows are laid out as the weight's
                    for weight in (att.linear_qkv.weight, None if adapter is None else adapter.linear_out.weight):
                        if weight is None or not weight.requires_grad:  # LoRA's frozen base: K and V stay tied
                            continue
                        for w in {id(t): t for t in (weight, self._optimizer.main(weight))}.values():
                            rows = w.view(ng, (rep + 2) * hn, -1)
                            rows[:, (rep + 1) * hn:].copy_(rows[:, rep * hn:(rep + 1) * hn])
        return norm

    def train_layers(self, layers, embedding: bool = False) -> None:
        """Only the text decoder ``layers`` train, and the word embedding when ``embedding``
        (``megatron_layout.train_layers``: the rest frozen)."""
        train_layers(self.model, layers, embedding)

    def _grad_norm(self, pairs) -> torch.Tensor:
        """megatron-core's global gradient norm over the ranks (``megatron_layout.grad_norm``)."""
        return grad_norm(pairs, self._experts(), next(self.model.parameters()).device)

    def grads(self, want=None):
        """Its parameters' gradients in HF layout, by its weight mapping's adjoint (``parity.bridge.convert``), after
        megatron's data-parallel reduction (``finalize_grads``); in a world of several ranks each gradient's shards
        are gathered (TP slices, EP experts). ``want``: the decoder's tensors are assembled only where it accepts one
        of their HF keys (the vision and audio towers' are renames, the adapters small: all of them)."""
        from parity.bridge import convert, vision

        self.finalize_grads()
        params = dict(self.model.named_parameters())
        # a parameter without a gradient (none reached it, or a buffer): zeros; in one process zeros that take no
        # memory (one element expanded: the isolated backward reads the gradients a layer at a time, at full size 47 GiB
        # of real zeros each); in a world of several ranks real ones (collectives gather contiguous tensors)
        world = several_ranks()
        zeros = torch.zeros_like if world else (lambda v: v.new_zeros(()).expand_as(v))
        sd = {k: params[k].grad if k in params and params[k].grad is not None else zeros(v)
              for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}
        if self.lora is not None:  # the base is frozen: the adapters' gradients, by the mapping's adjoints
            from parity.bridge import adapters as BA

            yield from ((A.param_key(k), g) for k, g in BA.megatron_to_hf(
                self._whole_adapters(sd), self.args, self._hf_prefix(), grads=True))
            return
        if not self.vlm:
            yield from (convert.iter_gather_from_world if world else convert.iter_megatron_to_hf)(
                sd, self.args, grads=True, want=want)
            return
        text = {k[len(TEXT_MC):]: v for k, v in sd.items() if k.startswith(TEXT_MC)}
        yield from (convert.iter_gather_from_world if world else convert.iter_megatron_to_hf)(
            text, self.args, arch="Gemma4ForConditionalGeneration", grads=True, want=want)
        yield from vision.megatron_to_hf_vision(_vision_from_ranks(sd), "model.").items()  # renames only
        if self.audio:
            from parity.bridge import audio

            yield from audio.megatron_to_hf_audio({k[len(AUDIO_MC):]: v for k, v in sd.items()
                                                   if k.startswith(AUDIO_MC)}, "model.").items()

    @contextmanager
    def fp32(self, path: str):
        """``path`` (a text decoder layer or the final norm) as an fp32 copy: the layer built from its own spec
        with an fp32 config, the norm from its class, both loaded with the model's weights upcast. Yields
        ``name -> module`` for the copy's modules (by their names in the model)."""
        from parity.models.norms import Gemma4RMSNorm

        src = self._modules[path]
        if isinstance(src, Gemma4RMSNorm):
            copy = Gemma4RMSNorm(src.weight.shape[0], eps=src.eps, dtype=torch.float32).to(self.device)
            copy.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
        else:
            copy = _layer_fp32(self.lm, int(path.rsplit(".", 1)[1]), self.device)
        subs = {path + (f".{n}" if n else ""): m for n, m in copy.named_modules()}
        yield subs.get

    def tables(self) -> dict[str, Any]:
        out = {f"masks[{t}]": m for t, m in self.masks.items()}
        for t, freqs in self.rope.items():  # [s, b, 1, d] -> (cos, sin) [b, s, d] in the run's dtype
            out[f"rotary_tables[{t}]"] = tuple(f(freqs).to(self.dtype)[:, :, 0].transpose(0, 1)
                                               for f in (torch.cos, torch.sin))
        if self.vlm:
            out["vision.masks[encoder]"] = self.vmask
        if getattr(self, "amask", None) is not None:
            out["audio.masks[blocked]"] = self.amask
        return out

    # -- layouts -----------------------------------------------------------------------------------

    def output(self, a: Aligned, out: Any, module: nn.Module, grad: bool = False) -> Any:
        """A hooked output (``[s, b, ...]``, TP shards; or its gradient: ``grad``, laid out as the value: its converter
        refuses TP above the KV heads, so no head is on several ranks) -> HF layout. Its towers are batch-first
        already (the vision tower's TP shards gathered: ``_vision_whole``)."""
        if a.row.stack is Stack.VISION:
            return _vision_whole(a, value(a.row.kind, out), "output")
        if a.row.stack is Stack.AUDIO:
            return value(a.row.kind, out)
        return self._OUTPUT.get(a.row.kind, ParitySystem._out_layout)(self, a, out, module)

    def input_key(self, a: Aligned, args: tuple, kwargs: dict) -> int | str | None:
        """Where HF's main input of ``a`` is among its module's arguments: its MoE layer's second (the experts'
        input; the first is the router's), every other module's first."""
        return 1 if a.row.kind is Kind.EXPERTS else 0 if args else None

    def input_layout(self, a: Aligned, x: torch.Tensor, module: nn.Module, grad: bool = False) -> torch.Tensor:
        """Its vision tower's inputs are HF's layout already (batch-first); the text model's are ``[s, b, ...]``
        (a gradient, ``grad``, as the value: ``output``)."""
        if a.row.stack is Stack.VISION:
            return _vision_whole(a, x, "input")
        return x if a.row.stack is Stack.AUDIO else input_to_hf(a, x, self.b, self.s, module)

    def _out_as_is(self, a: Aligned, out: Any, module: nn.Module) -> Any:
        """Its embedding, logits and image scatter: batch-first and whole already."""
        return value(a.row.kind, out)

    def _out_router(self, a: Aligned, out: Any, module: nn.Module) -> dict:
        """Its router's ``(probs [s*b, E], ...)`` and the top-k it kept -> HF token order."""
        top_w, top_i = module.last_top_k
        b, s = self.b, self.s
        return {"dense": hf_token_order(out[0], b, s), "top_w": hf_token_order(top_w, b, s),
                "top_i": hf_token_order(top_i, b, s)}

    def _out_layout(self, a: Aligned, out: Any, module: nn.Module) -> torch.Tensor:
        x = first(out)
        if a.row.kind is Kind.LINEAR and getattr(module, "gather_output", True) is False:  # a KV-shared layer's Q
            x = tp_gather(x)
        return to_hf(a, x, self.b, self.s, self.args)

    _OUTPUT = {Kind.EMBEDDING: _out_as_is, Kind.LOGITS: _out_as_is, Kind.MERGED: _out_as_is, Kind.ROUTER: _out_router}

    # -- isolated replay ---------------------------------------------------------------------------

    def replay(self, a: Aligned, module: nn.Module | None, call) -> Any:
        """``module`` on ``call``'s inputs in HF layout (for rows with ``feeds``: on those modules' outputs)."""
        if a.row.stack is Stack.VISION:  # at TP > 1 on this rank's part of HF's input where its module reads one
            split = _vision_split(a)
            x = _main_input(call).to(self.device)
            x = tp_split(x) if split in ("input", "features") else split_heads(x) if split == "heads" else x
            return _vision_whole(a, value(a.row.kind, self._vision_replay(module, x)), "output")
        if a.row.stack is Stack.AUDIO:
            return value(a.row.kind, self._audio_replay(module, _main_input(call).to(self.device)))
        handler = self._REPLAY.get(a.row.kind)
        if handler is None:
            raise ValueError(f"no replay for kind {a.row.kind}")
        return handler(self, a, module, call)

    def _replay_merged(self, a: Aligned, module, call) -> torch.Tensor:
        """The scatter of HF's captured text embeddings and image features, then (with an audio tower) of HF's
        captured ``embed_audio`` output at its own real frames."""
        emb, feats, *audio = (t.to(self.device) for t in call.args)
        ids = self.inputs["input_ids"]
        merged = self.model.image_scatter(emb, feats, ids == self.model.image_token_id)
        if audio:
            merged = self.model.audio_scatter(merged, audio[0][self.amasks[-1]], ids == self.model.audio_token_id)
        return merged

    def _replay_logits(self, a: Aligned, module, call) -> torch.Tensor:  # lm_head + softcap on HF's final norm
        return self.lm.output_logits(sb(call.args[0].to(self.device)))

    def _replay_embedding(self, a: Aligned, module, call) -> torch.Tensor:
        return module(call_arg(call, "input_ids", device=self.device))

    def _replay_norm(self, a: Aligned, module, call) -> torch.Tensor:
        """A norm is per token over the last dim: it runs on HF's input in whatever layout HF gave it; a q/k norm
        at TP > 1 on this rank's heads, as in its model (its weight's gradient is then this rank's part, which its
        ``finalize_grads`` sums over TP), the heads gathered after."""
        x = call_arg(call, "hidden_states", device=self.device)
        if a.row.kind is not Kind.HEAD_NORM or tp_size() == 1:
            return module(x)
        return gather_heads(module(split_heads(x)), x.shape[2])

    def _replay_flat_norm(self, a: Aligned, module, call) -> torch.Tensor:
        return module(call_arg(call, "hidden_states", device=self.device))

    def _replay_layer(self, a: Aligned, module, call) -> torch.Tensor:
        """A decoder layer or its self-attention, with its own mask and RoPE table of the layer's type; a KV-shared
        layer on the K/V HF's layer received (``shared_kv_states``), a layer with per-layer embeddings on HF's
        per-layer input."""
        lt = self.layer_types[a.layer]
        x = call_arg(call, "hidden_states", device=self.device)
        shared_kv = self._shared_kv(a, call)
        if a.row.kind is Kind.ATTENTION:
            return sb(module(sb(x), self.masks[lt], rotary_pos_emb=self.rope[lt], shared_kv=shared_kv)[0])
        per_layer = None
        if self.args.per_layer_size:
            per_layer = sb(call_arg(call, "per_layer_input", 1, device=self.device))
        return sb(module(sb(x), self.masks[lt], self.rope[lt], per_layer_input=per_layer, shared_kv=shared_kv))

    def _shared_kv(self, a: Aligned, call) -> dict:
        """HF's K/V for a KV-shared layer (its call's ``shared_kv_states[layer type]``, ``[b, heads, s, d]``) as our
        model holds them: ``{source layer: (K, V)}``, each ``[s, b, heads of this rank, d]``."""
        la = self.args.layers[a.layer]
        if not la.kv_shared:
            return {}
        kv = call.kwargs["shared_kv_states"][la.layer_type]
        n, rank = tp_size(), megatron_env.ranks()["tp_rank"]
        return {la.kv_source: tuple(t.to(self.device).permute(2, 0, 1, 3).chunk(n, dim=2)[rank] for t in kv)}

    def _replay_projection(self, a: Aligned, module, call) -> Any:
        """A linear (a row-parallel one on this rank's slice of the HF input: split so that the input's gradient is
        every rank's slice gathered; under LoRA the wrapped linear's), the fused QKV / FC1 or the MLP."""
        x = call_arg(call, "input", device=self.device)
        if a.row.kind is Kind.LINEAR and getattr(getattr(module, "to_wrap", module), "input_is_parallel", False):
            x = tp_split(x)
        return self.output(a, module(sb(x)), module)

    def _replay_router(self, a: Aligned, module, call) -> dict:
        dense, _ = module(call_arg(call, "hidden_states", device=self.device))
        top_w, top_i = module.last_top_k
        return {"dense": dense, "top_w": top_w, "top_i": top_i}

    def _replay_experts(self, a: Aligned, module, call) -> torch.Tensor:
        """Forced identical routing: HF's top-k indices and weights."""
        h = call_arg(call, "hidden_states", device=self.device)
        dtype = call_arg(call, "top_k_weights", 2).dtype
        probs, routing_map = hf_routing(call, module.config.num_moe_experts, dtype, self.device)
        return module.experts_forward(h[:, None, :], probs, routing_map)[:, 0, :]

    def _replay_lm_head(self, a: Aligned, module, call) -> torch.Tensor:
        weight = self.lm.embedding.word_embeddings.weight if self.args.tie_word_embeddings else None
        out, _ = module(sb(call_arg(call, "input", device=self.device)), weight=weight)
        return sb(tp_gather(out))

    _REPLAY = {
        Kind.MERGED: _replay_merged, Kind.LOGITS: _replay_logits, Kind.EMBEDDING: _replay_embedding,
        Kind.NORM: _replay_norm, Kind.HEAD_NORM: _replay_norm, Kind.FLAT_NORM: _replay_flat_norm,
        Kind.LAYER: _replay_layer, Kind.ATTENTION: _replay_layer,
        **dict.fromkeys((Kind.LINEAR, Kind.QKV, Kind.FC1, Kind.MLP), _replay_projection),
        Kind.ROUTER: _replay_router, Kind.EXPERTS: _replay_experts, Kind.LM_HEAD: _replay_lm_head,
    }

    def _vision_replay(self, module: nn.Module, x: torch.Tensor) -> Any:
        """A vision module on HF's captured input, with its own positions-derived padding, RoPE and mask."""
        from parity.models import vision as V

        pos, pad = self.positions, self.padding
        if isinstance(module, (V.VisionModel, V.VisionRotaryEmbedding)):
            return module(x, pos)
        if isinstance(module, (V.VisionPatchEmbedder, V.VisionEncoder, V.VisionPooler)):
            return module(x, pos, pad)
        if isinstance(module, (V.VisionEncoderLayer, V.VisionSelfAttention)):
            return module(x, self.vcos, self.vsin, self.vmask)
        return module(x)

    def _audio_replay(self, module: nn.Module, x: torch.Tensor) -> Any:
        """An audio module on HF's captured input, with its own frame masks, relative positions and blocked mask."""
        from parity.models import audio as A

        sub = self.model.audio.audio_model.subsample
        if isinstance(module, (A.AudioModel, A.AudioSubsample)):
            return module(x, self.amasks[0])
        if isinstance(module, A.AudioSubsampleBlock):
            return module(x, self.amasks[0 if module is sub.layer0 else 1])
        if isinstance(module, (A.AudioConformerLayer, A.AudioChunkedAttention)):
            return module(x, self.apos, self.amask)
        return module(x)


def _fp32_adapter(wrapper: nn.Module) -> None:
    """A LoRA adapter held and computed in fp32 inside a lower-precision model, as peft keeps and runs its adapters
    (``autocast_adapter_dtype``): its input cast up, the base output plus its fp32 output rounded once, to the base
    output's dtype."""
    wrapper.adapter.float()

    def up(module, args, kwargs):
        return (args[0].float(), *args[1:]), kwargs

    def round_once(module, args, out):
        y, bias = out
        return y.to(args[0].dtype), bias
    wrapper.adapter.register_forward_pre_hook(up, with_kwargs=True)
    wrapper.register_forward_hook(round_once)


_LORA_TARGETS = {"q_proj": "self_attention.linear_qkv", "k_proj": "self_attention.linear_qkv",
                 "v_proj": "self_attention.linear_qkv", "o_proj": "self_attention.linear_proj",
                 "gate_proj": "mlp.linear_fc1", "up_proj": "mlp.linear_fc1", "down_proj": "mlp.linear_fc2"}


def _lora_targets(spec, prefix: str) -> list[str]:
    """The LoRA transform's ``target_modules`` (wildcards of our module names) for the case's HF targets: the text
    decoder's linears (under ``prefix`` in the VLM, whose vision encoder has a ``linear_proj`` too)."""
    return list(dict.fromkeys(f"{prefix}decoder.layers.*.{_LORA_TARGETS[n]}" for n in spec.targets))


def _layer_fp32(lm, i: int, device):
    """An fp32 copy of just decoder layer ``i`` of our Megatron text model ``lm``: built from its own spec with an
    fp32 config, loaded from the model under test (its weights upcast)."""
    from parity.models.text import Gemma4TransformerLayer, layer_spec, transformer_config

    args = lm.args
    la = args.layers[i]
    config = transformer_config(args, la, torch.float32, str(device).split(":")[0])
    with torch.device(device):
        layer = Gemma4TransformerLayer(config, layer_spec(args.enable_moe_block), i + 1, la, args.enable_moe_block,
                                       per_layer_size=args.per_layer_size)
    src = {k: v for k, v in lm.decoder.layers[i].state_dict().items() if not k.endswith("_extra_state")}
    missing = [k for k in layer.state_dict() if k not in src and not k.endswith("_extra_state")]
    if missing:
        raise RuntimeError(f"fp32 replay: Megatron layer {i} copy lacks {missing[:3]}")
    layer.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in src.items()}, strict=False)
    return layer.to(device).eval()
