"""Forward hooks on Megatron-Bridge's model by module name: what ``alignment.Twin`` rows observe."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _first(x):
    while isinstance(x, (tuple, list)):
        x = x[0]
    return x


@contextmanager
def observe(model: torch.nn.Module, twins) -> dict:
    """Within the block, ``seen[(module, io)]`` holds a detached copy of each listed twin's first input or
    first output tensor at its first call (``observable=False`` twins are still hooked: the value is the
    nearest observable one). Yields the dict, filled as the model runs."""
    modules = dict(model.named_modules())
    seen: dict = {}
    handles = []
    for twin in twins:
        if twin.module not in modules:
            raise KeyError(f"Megatron-Bridge model has no module {twin.module!r}")
        key = (twin.module, twin.io)
        if twin.io == "input":
            def pre(mod, args, kwargs, key=key):
                value = args[0] if args else next(iter(kwargs.values()))
                seen.setdefault(key, _first(value).detach().clone())
            handles.append(modules[twin.module].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, out, key=key):
                seen.setdefault(key, _first(out).detach().clone())
            handles.append(modules[twin.module].register_forward_hook(post))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
