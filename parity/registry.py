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

# What a system cannot run whatever is installed: a case feature ("lora.experts": LoRA on the routed experts) -> why,
# in one line (the case is skipped with it, a run refuses it).
REFUSES = {
    "parity": {"lora.experts": "LoRA on the routed experts: our experts (parity.models.text.Gemma4Experts) read their "
                               "stacked weights directly, with no linear module Megatron-Bridge's LoRA transform can "
                               "wrap",
               "parallel.sequence_parallel": "sequence parallelism: our model (parity.models.text) is built without it"},
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


def refuses(name: str, case) -> str | None:
    """Why system ``name`` cannot run ``case`` at all (``REFUSES``), or None."""
    lora = getattr(case, "lora", None)
    features = {"lora.experts": lora is not None and lora.experts is not None,
                "parallel.sequence_parallel": bool(getattr(getattr(case, "parallel", None), "sequence_parallel", False))}
    return next((why for feature, why in REFUSES.get(name, {}).items() if features[feature]), None)


def unavailable(name: str, case) -> str | None:
    """Why system ``name`` cannot run ``case`` here: it refuses the case (``REFUSES``), or a package it needs for it
    does not import; or None."""
    import importlib

    why = refuses(name, case)
    if why is not None:
        return f"system {name}: {why}"
    needs = REQUIRES.get(name, {})
    for feature in (None, "lora"):
        if feature in needs and (feature is None or getattr(case, feature, None) is not None):
            module, function = needs[feature][0].split(":")
            ok, reason = getattr(importlib.import_module(module), function)()
            if not ok:
                return f"{needs[feature][1]}: {reason}"
    return None
