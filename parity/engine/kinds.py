"""Model kinds: the HF side of a run. ``text`` (``Gemma4ForCausalLM``) and ``vlm``
(``Gemma4ForConditionalGeneration``) each build the HF model (random weights from a builder, or a local
checkpoint), make the case's raw inputs, run HF's forward (also in fp32, for the bf16 noise floor), say where
their stacks sit for the alignment table, and split positions into groups.
"""
from __future__ import annotations

import copy
import os

import torch

from parity import config as C
from parity.cases import check_step_layers
from parity.engine.alignment import Stack
from parity.engine.compare import to_device, upcast
from parity.errors import UserError


def _check_memory(need: int, device: str, what: str) -> None:
    """Refuse (one line, exit 2) a checkpoint whose weights cannot fit where the HF model will live."""
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need * 1.05 > free:
        raise UserError(f"out of memory: {what} needs {need / 2**30:.1f} GiB of weights on {device}, "
                        f"only {free / 2**30:.1f} GiB free")


def _fits(missing, unexpected) -> None:
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _from_checkpoint(folder: str, dtype: torch.dtype, device: str, case, architecture: str | None = None):
    """``(hf_config, state)`` of a local HF folder, validated against HF's own model class (files, keys, shapes,
    memory) before anything is instantiated. ``architecture``: the folder must be a checkpoint of that class;
    without it (a text case) the state is the folder's ``Gemma4ForCausalLM`` part (a VLM's language model)."""
    from parity import hf_checkpoint

    info = hf_checkpoint.inspect(folder)
    if architecture is not None and info.architecture != architecture:
        raise UserError(f"{folder}: a {info.architecture} checkpoint, but case {case.name} needs a {architecture}")
    keys = [k for k in info.tensors if k in info.expected] if architecture is not None else \
        hf_checkpoint.text_keys(info)  # not the keys HF's loader drops (KV-shared layers' K/V)
    _check_memory(info.bytes_as(dtype, keys), device, folder)
    return info.config, hf_checkpoint.load(info, dtype=dtype, device="cpu", keys=keys)


class _Returns(torch.nn.Module):
    """Stands in for a submodule of an HF model: returns what it is given to (``fn`` of its first input)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def hf_head(model, hidden: torch.Tensor, inputs: dict, lm_head, output: str = "Gemma4TextModelOutputWithPast"
            ) -> torch.Tensor:
    """The logits from the final hidden state through HF's own top-level forward (``Gemma4ForCausalLM`` or
    ``Gemma4ForConditionalGeneration``: its slicing, ``lm_head``, softcap; issue 11 item 4: a floor from the same
    code path as the output it qualifies): a shallow shell of ``model`` whose inner model returns ``hidden`` (as
    HF's ``output`` class, every other field None) and whose ``lm_head`` is ``lm_head``."""
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.models.gemma4 import modeling_gemma4

    out_cls = getattr(modeling_gemma4, output, BaseModelOutputWithPast)  # its own fields
    shell = copy.copy(model)
    shell._modules = dict(model._modules)  # the shell's own module table: the model itself is untouched
    shell._modules["model"] = _Returns(lambda *a, **kw: out_cls(last_hidden_state=hidden))
    shell._modules["lm_head"] = _Returns(lm_head)
    with torch.no_grad():
        return shell(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], use_cache=False).logits


def layer_call(call, h: torch.Tensor, position_embeddings, device, fp32: bool = False) -> tuple[tuple, dict]:
    """How HF's text model calls a decoder layer, from that layer's captured call: the hidden states replaced
    by ``h``, every other captured argument as HF passed it (the positional ``per_layer_input`` too), and
    ``position_embeddings`` recomputed by the caller (fp32 passes: HF's rotary module in fp32)."""
    args, kwargs = to_device(tuple(call.args[1:]), device), to_device(dict(call.kwargs), device)
    if fp32:
        args, kwargs = upcast(args), upcast(kwargs)
    kwargs["position_embeddings"] = position_embeddings
    return (h, *args), kwargs


class TextKind:
    name = "text"
    prefixes = {Stack.TEXT: "model.", Stack.ROOT: ""}

    def check(self, case, checkpoint: str | None = None) -> None:
        """Refuse (one line) what this kind cannot run, before any model is built: with a builder's config (no
        checkpoint), a ``train.step_layers`` or ``train.grad_layers`` index beyond its layers (at 26B HF's build takes
        ~13 s)."""
        if checkpoint is None and case.train is not None and (case.train.step_layers or case.train.grad_layers):
            config = self.builder_config(case)
            if config is not None:
                check_step_layers(case, self.text_config(config).num_hidden_layers)

    def builder_config(self, case):
        """HF's config from the case's builder, no model built (None for a builder ``build`` refuses)."""
        builder = C.TEXT_BUILDERS.get(case.model.builder)
        return None if builder is None else C.make_text_config(builder(**case.model.overrides))

    def build(self, case, dtype: torch.dtype, device: str, checkpoint: str | None, seed: int):
        """HF Gemma4ForCausalLM from the case's builder (random weights) or from a local checkpoint."""
        from transformers import Gemma4ForCausalLM

        from parity.engine.randomize import randomize_

        if checkpoint:
            hf_config, state = _from_checkpoint(checkpoint, dtype, device, case)  # a VLM checkpoint: its text part
            config = getattr(hf_config, "text_config", None) or hf_config
            with torch.device(device):
                model = Gemma4ForCausalLM._from_config(config, torch_dtype=dtype)
            _fits(*model.load_state_dict(state, strict=False))
            return model.eval(), config
        if case.model.builder not in C.TEXT_BUILDERS:
            raise UserError(f"unknown text model builder {case.model.builder!r}")
        config = C.make_text_config(C.TEXT_BUILDERS[case.model.builder](**case.model.overrides))
        C.check_supported(config)
        config._attn_implementation = "sdpa"
        with torch.device(device):
            model = Gemma4ForCausalLM._from_config(config, torch_dtype=dtype)
        randomize_(model, seed=seed)
        return model.eval(), config

    def text_config(self, config):
        return config

    def vision_layers(self, config) -> int:
        return 0

    def audio_layers(self, config) -> int:
        return 0

    def audio_frames(self, inputs) -> torch.Tensor | None:
        """``[clips, frames]`` real audio frames at the audio tower's output rate (None without audio)."""
        return None

    def inputs(self, config, case, seed: int, device: str) -> dict[str, torch.Tensor]:
        from parity.engine.inputs import text_inputs

        i = case.inputs
        return text_inputs(config.vocab_size, i.batch, i.seq_len, i.pad_tail, seed, config.pad_token_id or 0, device,
                           padding=i.padding, lengths=i.lengths, position_offset=i.position_offset)

    def forward(self, model, inputs):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], use_cache=False).logits

    def forward_train(self, model, inputs, labels):
        """HF's forward with ``labels``: its output carries the model's own ``loss``."""
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], labels=labels, use_cache=False)

    def forward_fp32(self, model, inputs, cap, run_copy, prog):
        """HF's own forward in fp32, one text decoder layer resident at a time (``streamed``)."""
        return self.streamed(model, run_copy, prog, lambda m: self.forward(m, inputs)).float()

    def streamed(self, model, run_copy, prog, call, label: str = "fp32 floor"):
        """``call(m)`` with ``m`` HF's model in fp32 one text decoder layer at a time (at the 26B-A4B shape a whole fp32
        copy is 100 GB beside the bf16 model): ``m(**kw)`` is ``run_copy(model, "", **kw)`` on a model whose text
        decoder layers are stand-ins without weights (an fp32 copy of it holds the embedders, per-layer inputs, vision
        tower, merge, norm and head), and each stand-in's call is ``run_copy(layer, its HF path, ...)`` (HF's forward
        passes it its masks, RoPE, per-layer input and shared K/V as it passes the real layer). The forward floors
        copy and run each module once; the backward floors (``parity.engine.modes.backward``) recompute a layer in
        its backward."""
        text = self.text_model(model)
        layers, prefix = text.layers, f"{self.prefixes[Stack.TEXT]}layers"

        def layer_fp32(i, *args, **kwargs):
            prog.note(f"{label}: layer {i + 1}/{len(layers)}")
            return run_copy(layers[i], f"{prefix}.{i}", *args, **kwargs)
        text.layers = torch.nn.ModuleList(_Streamed(layer_fp32, i) for i in range(len(layers)))
        try:
            return call(lambda **kw: run_copy(model, "", **kw))
        finally:
            text.layers = layers

    def text_model(self, model):
        return model.model

    def head_fp32(self, model, hidden, inputs, lm_head):
        """fp32 logits from a final hidden state, through HF's own forward (its lm_head call and softcap)."""
        return hf_head(model, hidden, inputs, lm_head).float()

    def groups(self, inputs) -> dict | None:
        return None

    def describe(self, case, config, inputs) -> dict:
        b, s = inputs["input_ids"].shape
        return {"batch": b, "seq_len": s, "pad_tail": case.inputs.pad_tail, "padding": case.inputs.padding,
                "lengths": inputs["attention_mask"].sum(1).tolist(), "position_offset": case.inputs.position_offset}


def audio_attention() -> str:
    """The attention implementation HF's audio tower is built with: the one its own class declares it supports.
    Its chunked attention is written out (no SDPA call either way); what the choice sets is the mask format
    ``create_bidirectional_mask`` hands it, which must be the one its attention reads. transformers 5.17's reads a
    boolean mask (``masked_fill(~mask)``) and leaves SDPA supported (boolean masks); from 5.2x it reads an additive one
    (``masked_fill(mask != 0)``) and declares eager alone (``_supports_sdpa = False``). Forcing eager on 5.17 hands
    its boolean-reading attention an additive mask: every frame's attention inverted (measured on an H100: HF's own
    audio tower 0.5 from the correct one, its blocked mask 299 entries off)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel

    return "sdpa" if getattr(Gemma4AudioModel, "_supports_sdpa", False) else "eager"


class VlmKind(TextKind):
    name = "vlm"
    prefixes = {Stack.VISION: "model.", Stack.AUDIO: "model.", Stack.TEXT: "model.language_model.", Stack.ROOT: "",
                Stack.VLM: ""}

    def build(self, case, dtype: torch.dtype, device: str, checkpoint: str | None, seed: int):
        """HF Gemma4ForConditionalGeneration from a VLM builder (random weights: ``tiny_vlm``, ``tiny_vlm_audio``,
        ``full_vlm``, ...) or a checkpoint, with SDPA attention; its audio tower with ``audio_attention()``."""
        from transformers import Gemma4ForConditionalGeneration

        from parity.engine.randomize import randomize_
        from parity.vlm_config import VLM_BUILDERS, VisionArgs, check_supported_vlm, make_vlm_config

        if checkpoint:
            config, state = _from_checkpoint(checkpoint, dtype, device, case, "Gemma4ForConditionalGeneration")
        elif case.model.builder not in VLM_BUILDERS:
            raise UserError(f"unknown VLM model builder {case.model.builder!r}")
        else:
            try:
                config = make_vlm_config(VLM_BUILDERS[case.model.builder](**case.model.overrides))
            except TypeError as e:
                raise UserError(f"case {case.name}: model.overrides: {e}") from None
        check_supported_vlm(config)
        VisionArgs.from_hf(config)  # refuses vision features the Megatron tower lacks
        attn = "sdpa" if config.audio_config is None else \
            {"": "sdpa", "text_config": "sdpa", "vision_config": "sdpa", "audio_config": audio_attention()}
        with torch.device(device):
            model = Gemma4ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
        if checkpoint:
            _fits(*model.load_state_dict(state, strict=False))
        else:
            randomize_(model, seed=seed)
        return model.eval(), config

    def text_config(self, config):
        return config.text_config

    def builder_config(self, case):
        from parity.vlm_config import VLM_BUILDERS, make_vlm_config

        builder = VLM_BUILDERS.get(case.model.builder)
        try:
            return None if builder is None else make_vlm_config(builder(**case.model.overrides))
        except TypeError:  # bad overrides: ``build`` says so
            return None

    def vision_layers(self, config) -> int:
        return config.vision_config.num_hidden_layers

    def audio_layers(self, config) -> int:
        return config.audio_config.num_hidden_layers if config.audio_config is not None else 0

    def audio_frames(self, inputs) -> torch.Tensor | None:
        from parity.engine.vlm_inputs import audio_tokens

        mask = inputs.get("input_features_mask")
        return None if mask is None else audio_tokens(mask.bool())

    def inputs(self, config, case, seed: int, device: str) -> dict[str, torch.Tensor]:
        """The case's images (``[h, w]`` per image, per sequence), text around them, right padding. With
        ``inputs.seq_len`` every sequence is filled with text up to it, the last one leaving ``pad_tail``
        padded positions."""
        from parity.engine.inputs import repad
        from parity.engine.vlm_inputs import DEFAULT_IMAGE_SIZES, DEFAULT_TEXT_RUNS, build_vlm_inputs

        n, pad_tail = case.inputs.seq_len, case.inputs.pad_tail
        images = tuple(tuple(tuple(hw) for hw in seq) for seq in (case.inputs.images or DEFAULT_IMAGE_SIZES))
        if len(images) != case.inputs.batch:
            raise UserError(f"case {case.name}: {len(images)} sequences of images but inputs.batch is "
                            f"{case.inputs.batch}")
        runs = DEFAULT_TEXT_RUNS if [len(s) for s in images] == [len(r) - 1 for r in DEFAULT_TEXT_RUNS] else \
            tuple(tuple([5 + 2 * j] + [4] * (len(s) - 1) + [6]) for j, s in enumerate(images))
        runs = [list(r) for r in runs]  # text tokens before, between and after the images of each sequence
        audio = case.inputs.audio
        if config.audio_config is None and audio is not None:
            raise UserError(f"case {case.name}: inputs.audio needs a model with an audio tower")
        if config.audio_config is not None and audio is None:
            raise UserError(f"case {case.name}: the model has an audio tower: give inputs.audio (clip durations in "
                            "ms per sequence)")
        if case.inputs.padding != "right" and audio is not None:
            raise UserError(f"case {case.name}: inputs.audio runs with right padding only")
        try:
            budget = dict(max_soft_tokens=case.inputs.max_soft_tokens, audio_ms=audio)
            inputs = build_vlm_inputs(config, seed=seed, image_sizes=images, text_runs=runs, **budget)
            if n:
                lengths = inputs["attention_mask"].sum(1).tolist()
                for j, have in enumerate(lengths):
                    target = n - (pad_tail if j == len(lengths) - 1 else 0)
                    if target < have:
                        raise UserError(f"case {case.name}: inputs.seq_len {n} (pad_tail {pad_tail}) is too short "
                                        f"for sequence {j}: its images and text need {have} tokens")
                    runs[j][-1] += target - have
                inputs = build_vlm_inputs(config, seed=seed, image_sizes=images, text_runs=runs, **budget)
                short = n - inputs["input_ids"].shape[1]
                if short > 0:  # every sequence ends in padding
                    pad = config.text_config.pad_token_id or 0
                    for key, v in (("input_ids", pad), ("attention_mask", 0), ("mm_token_type_ids", 0)):
                        inputs[key] = torch.nn.functional.pad(inputs[key], (0, short), value=v)
                    inputs["position_ids"] = torch.arange(n).expand(case.inputs.batch, -1).clone()
        except ValueError as e:  # an image too large for the tiny tower's position tables, ...
            raise UserError(f"case {case.name}: inputs.images: {e}") from None
        inputs = repad(inputs, case.inputs.padding, case.inputs.position_offset)  # left padding, offset positions
        return {k: v.to(device) for k, v in inputs.items()}

    def forward(self, model, inputs):
        return model(**inputs, use_cache=False).logits

    def forward_train(self, model, inputs, labels):
        return model(**inputs, labels=labels, use_cache=False)

    def head_fp32(self, model, hidden, inputs, lm_head):
        """fp32 logits from a final hidden state through HF's own ``Gemma4ForConditionalGeneration.forward``."""
        return hf_head(model, hidden, inputs, lm_head, output="Gemma4ModelOutputWithPast").float()

    def text_model(self, model):
        return model.model.language_model

    def groups(self, inputs) -> dict:
        """``[b, s]`` bool masks of the real positions of each group: ``text`` (mm type 0, BOI/EOI included),
        ``image`` (type 1) and ``text_after_image`` (text positions with an image token earlier on)."""
        valid, mm = inputs["attention_mask"].bool(), inputs["mm_token_type_ids"]
        image, text = mm == 1, mm == 0
        seen_image = torch.cumsum(image.long(), dim=-1) > 0
        return {"text": text & valid, "image": image & valid, "text_after_image": text & seen_image & valid}

    def describe(self, case, config, inputs) -> dict:
        from parity.vlm_config import soft_tokens_per_image

        pos = inputs["image_position_ids"]
        return {**super().describe(case, config, inputs),
                "images": [list(map(list, seq)) for seq in (case.inputs.images or [])], "num_images": int(pos.shape[0]),
                "soft_tokens_per_image": soft_tokens_per_image(pos, config.vision_config.pooling_kernel_size),
                "max_soft_tokens": case.inputs.max_soft_tokens,
                "sliding_window": config.text_config.sliding_window,
                **({} if case.inputs.audio is None else {
                    "audio_ms": [list(seq) for seq in case.inputs.audio],
                    "audio_frames": inputs["input_features_mask"].sum(1).tolist(),
                    "audio_soft_tokens": self.audio_frames(inputs).sum(1).tolist()})}


class _Streamed(torch.nn.Module):
    """Stands in for decoder layer ``i`` in a model about to be copied: no weights of its own (the copy stays
    small), its call runs ``run(i, ...)``; copied, it is the same stand-in."""

    def __init__(self, run, i: int):
        super().__init__()
        self.run, self.i = run, i

    def __deepcopy__(self, memo):
        return _Streamed(self.run, self.i)

    def forward(self, *args, **kwargs):
        return self.run(self.i, *args, **kwargs)


KINDS = {"text": TextKind(), "vlm": VlmKind()}
GROUPS = ("text", "image", "text_after_image")
