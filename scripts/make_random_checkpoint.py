"""Write a random Gemma 4 checkpoint in HF format (sharded safetensors + index) to prove the real-checkpoint
path without downloadable weights: ``python scripts/make_random_checkpoint.py --shape full --out DIR``, then
``python -m parity run --case gemma4-26b-a4b --checkpoint DIR``. Every parameter and persistent buffer is
randomised per element (parity.engine.randomize); the model is built directly in the target dtype."""
from __future__ import annotations

import argparse

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-shard-gib", type=float, default=5.0)
    a = ap.parse_args()
    from transformers import Gemma4ForCausalLM

    from parity.bridge.io import save_folder
    from parity.config import full_text_config_kwargs, make_text_config, text_config_kwargs
    from parity.engine.randomize import randomize_

    dtype = getattr(torch, a.dtype)
    cfg = make_text_config(full_text_config_kwargs() if a.shape == "full" else text_config_kwargs())
    with torch.device(a.device):
        model = Gemma4ForCausalLM._from_config(cfg, dtype=dtype)
    randomize_(model, seed=a.seed)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    del model
    save_folder(state, cfg, a.out, max_shard_bytes=int(a.max_shard_gib * 2**30))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
