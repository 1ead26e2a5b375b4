"""Random test weights really move every parameter and persistent buffer off its init constant (DESIGN.md §7),
and leave non-persistent computed buffers (inv_freq, embed_scale) alone."""
from __future__ import annotations

import math

import torch

from parity.engine.randomize import randomize_


def _check(model):
    before = {k: v.clone() for k, v in model.named_buffers() if k not in model.state_dict()}
    randomize_(model, seed=5)
    state = model.state_dict()
    for name, t in state.items():
        t = t.float()
        assert torch.isfinite(t).all(), name  # clip bounds become finite
        if t.numel() > 1:
            assert t.unique().numel() > t.numel() // 2, f"{name} is (nearly) constant"
        else:
            assert t.item() not in (0.0, 1.0) and not math.isinf(t.item()), f"{name} kept its init {t.item()}"
    for name, t in model.named_buffers():
        if name in before:
            assert torch.equal(t, before[name]), f"non-persistent {name} was touched"


def test_text_model_every_tensor_randomised():
    from transformers import Gemma4ForCausalLM

    from parity.config import make_text_config, text_config_kwargs

    _check(Gemma4ForCausalLM(make_text_config(text_config_kwargs())))


def test_vlm_every_tensor_randomised_and_clip_bounds_finite():
    from transformers import Gemma4ForConditionalGeneration

    from parity.vlm_config import make_vlm_config

    _check(Gemma4ForConditionalGeneration(make_vlm_config()))
