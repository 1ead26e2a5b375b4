"""The isolated floors' fp32 copies: one per layer (``isolated._Fp32Layers``) gives every floor a copy per row gave."""
from __future__ import annotations

import copy

import pytest

from parity.cases import load_case
from parity.engine import pipeline
from parity.engine.launch import cpu_threads
from parity.engine.modes import isolated


@pytest.mark.parametrize("case", ["gemma4-vlm-audio-tiny-bf16", "gemma4-text-tiny-bf16"])
def test_one_fp32_copy_per_layer_gives_the_floors_of_one_per_row(case, monkeypatch):
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case(case), device="cpu")
        per_layer = ref.floors["isolated"]
        copies = []
        real = isolated._Fp32Layers.__call__

        def counted(self, path):
            before = self.layer
            out = real(self, path)
            if self.layer != before:
                copies.append(self.layer)
            return out

        monkeypatch.setattr(isolated._Fp32Layers, "__call__", counted)
        isolated.floors(ref, None)
        monkeypatch.setattr(isolated._Fp32Layers, "__call__",
                            lambda self, path: copy.deepcopy(self.modules[path]).float())
        per_row = isolated.floors(ref, None)
    assert per_layer == per_row and len(per_row) > 100
    layers = {p.rsplit(".layers.", 1)[0] + ".layers." + p.rsplit(".layers.", 1)[1].split(".")[0]
              for p in per_row if ".layers." in p}
    assert sorted(copies) == sorted(layers)  # each layer copied once, its rows run on that copy
