"""The systems under test by name (no heavy imports: case files are validated against it before torch loads)."""
from __future__ import annotations

SYSTEMS = {"parity": "parity.systems.ours:ParitySystem",
           "megatron-bridge": "parity.systems.megatron_bridge:MegatronBridgeSystem"}  # name -> "module:factory"
DEFAULT_SYSTEM = "parity"
# What a system needs importable to run at all (``None``) or to run a case with a feature (``"lora"``): the check
# ("module:function" returning ``(ok, reason)``) and what to call the need in a skip reason. Read without importing
# the system (a collected case that cannot run here is skipped with the reason, not errored).
REQUIRES = {
    "megatron-bridge": {None: ("parity.mbridge:available", "system megatron-bridge")},
    "parity": {"lora": ("parity.mbridge:available", "LoRA (Megatron-Bridge's transform)")},
}


def known() -> str:
    return ", ".join(sorted(SYSTEMS))


def unknown(name: str) -> str:
    """The one message for a system name that is not registered (case files, flags, the registry lookup)."""
    return f"unknown system under test {name!r} (known: {known()})"


def get(name: str):
    """A new instance of system ``name`` (its module imported now), or a ``UserError`` naming the known ones."""
    import importlib

    from parity.errors import UserError

    if name not in SYSTEMS:
        raise UserError(unknown(name))
    module, factory = SYSTEMS[name].split(":")
    return getattr(importlib.import_module(module), factory)()


def unavailable(name: str, case) -> str | None:
    """Why system ``name`` cannot run ``case`` on this machine (a package it needs for it does not import), or None."""
    import importlib

    needs = REQUIRES.get(name, {})
    for feature in (None, "lora"):
        if feature in needs and (feature is None or getattr(case, feature, None) is not None):
            module, function = needs[feature][0].split(":")
            ok, reason = getattr(importlib.import_module(module), function)()
            if not ok:
                return f"{needs[feature][1]}: {reason}"
    return None
