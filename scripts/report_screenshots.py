"""Screenshots of a passing, a failing and the history page (docs/img/, 1280x800, headless Chromium).

    python scripts/report_screenshots.py [--out docs/img]

Real runs of the tiny text case on CPU: two clean runs, then one with the reference bridge's RoPE lane bug
planted on the Megatron side (full-attention layers rotate lane pairs (i, i + rot/2) of the first rot lanes,
with the right frequencies), written into a fresh report root; then each page is shot at 1280x800.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def planted_rope_lane_bug():
    """Patch parity.models.rope.apply_rotary as the bug shipped; returns an undo function."""
    import torch

    from parity.models import rope

    original = rope.apply_rotary

    def apply(t, freqs):
        hd = t.shape[-1]
        half = hd // 2
        rot = int((freqs[..., :half] != 0).any(dim=tuple(range(freqs.dim() - 1))).sum()) * 2
        if rot in (0, hd):  # default RoPE (sliding layers): untouched
            return original(t, freqs)
        angles = torch.cat([freqs[..., :rot // 2], freqs[..., half:half + rot // 2]], dim=-1)
        return torch.cat([original(t[..., :rot], angles), t[..., rot:]], dim=-1)  # pairs (i, i + rot/2)

    rope.apply_rotary = apply
    return lambda: setattr(rope, "apply_rotary", original)


def shoot(chromium: str, page: Path, png: Path, profile: Path) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,800", f"--user-data-dir={profile}", f"--screenshot={png}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    import torch

    from parity.cases import load_case
    from parity.engine.launch import execute
    from parity.report.store import write_run

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="parity-shots-"))
    root = tmp / "reports"
    case = load_case("gemma4-text-tiny")
    write_run(execute(case, device="cpu"), root)
    ok = write_run(execute(case, device="cpu"), root)
    undo = planted_rope_lane_bug()
    try:
        bad_results = execute(case, device="cpu")
    finally:
        undo()
    assert bad_results["passed"] is False, "the planted bug must fail"
    bad = write_run(bad_results, root)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, page in (("report-pass", ok / "index.html"), ("report-fail", bad / "index.html"),
                       ("report-history", root / "index.html")):
        shoot(chromium, page, args.out / f"{name}.png", tmp / "profile")
        print(args.out / f"{name}.png", (args.out / f"{name}.png").stat().st_size, "bytes")
    print("first divergence of the planted run:", bad_results["summary"]["first_divergence"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
