"""Round trip: the system's export of its loaded weights against HF's state dict, tensor by tensor, bit for bit.

Not rows but a section of its own (``roundtrip``) and a check (every tensor bit-exact). The tied ``lm_head``
of a model with tied embeddings is the embedding's tensor: not expected back.
"""
from __future__ import annotations

from parity.tensors import same_bits

MODE = "roundtrip"


def run(c, prog) -> None:
    skip = {"lm_head.weight"} if c.ref.text_args.tie_word_embeddings else set()
    rt = compare_weights(c.sut.export(), {k: v for k, v in c.ref.state.items() if k not in skip})
    c.sections["roundtrip"] = rt
    c.sections.setdefault("checks", {})["roundtrip"] = rt["bit_exact"] == rt["tensors"] and rt["tensors"] > 0


def compare_weights(pairs, ref: dict) -> dict:
    """The system's export against HF's state dict: each exported tensor is compared on its device with the
    reference (brought over from the host when staged there) and dropped."""
    rows, seen = [], set()
    for k, b_ in pairs:
        seen.add(k)
        a = ref.get(k)
        if a is None:
            rows.append({"name": k, "shape": list(b_.shape), "dtype": str(b_.dtype).replace("torch.", ""),
                         "bit_exact": False, "max_abs_diff": None, "problem": "unexpected key"})
            continue
        a = a.to(b_.device)
        exact = same_bits(a, b_)
        diff = 0.0 if exact else (float((a.float() - b_.float()).abs().max()) if a.shape == b_.shape else None)
        rows.append({"name": k, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", ""),
                     "bit_exact": exact, "max_abs_diff": diff})
        del a, b_
    for k in sorted(set(ref) - seen):
        rows.append({"name": k, "shape": None, "dtype": None, "bit_exact": False, "max_abs_diff": None,
                     "problem": "missing after round trip"})
    rows.sort(key=lambda r: (r["bit_exact"], r["name"]))
    diffs = [r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None]
    return {"tensors": len(rows), "bit_exact": sum(r["bit_exact"] for r in rows),
            "max_abs_diff": max(diffs) if diffs else None, "rows": rows}
