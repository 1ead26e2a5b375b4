#!/usr/bin/env bash
# One-call GPU check on a lent machine (Python 3.12, torch, transformers 5.17, no megatron-core):
# installs the carried megatron-core wheel, then runs the given cases (default: tiny on GPU + 26B-A4B).
# Usage (device tool, carry [".whl"]): bash scripts/gpu_check.sh [CASE ...] [gpu_run.py options, e.g. --system NAME]
#        bash scripts/gpu_check.sh gemma4-26b-a4b-train --system parity  (then --system megatron-bridge: one system a
#             call at full size, within the 600 s and the host's 128 GiB; docs/gpu.md item 2)
#        bash scripts/gpu_check.sh --plants [--case gemma4-26b-a4b] [--seq-len 2048] [--plants a,b]
#        bash scripts/gpu_check.sh --plants --sensitivity [--eps 1e-4,1e-5,1e-6] [--max-wall 360]  (gpu_plants.py)
#        bash scripts/gpu_check.sh --profile CASE [parity run options, e.g. --system megatron-bridge]
#             (cProfile of one `python -m parity run`: $OUT/profile-*.json, top entries and probing families' seconds)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
# byte-compiled once, as any installed package is: without it every run compiled megatron's sources again (~8 s of
# a 26B run's wall in the profile: 3,925 compile() calls)
python3 -m compileall -q -j 0 /tmp/site parity scripts >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-gpu_out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'grouped_mm', hasattr(torch, '_grouped_mm'))" | tee -a "$OUT/gpu.txt"
if [ "${1:-}" = "--plants" ]; then  # the planted-error detection table at the 26B shape (scripts/gpu_plants.py)
  shift
  python3 scripts/gpu_plants.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
  exit "${PIPESTATUS[0]}"
fi
if [ "${1:-}" = "--profile" ]; then  # where one run's wall goes (issue 23's speed work)
  case=$2; shift 2
  tag=$(echo "$case $*" | tr -c 'A-Za-z0-9_.\n-' '_' | tr -s _)
  python3 -m cProfile -o "$OUT/$tag.prof" -m parity run --case "$case" --device cuda --out "$OUT/run-$tag" "$@" \
    > "$OUT/$tag.log" 2>&1; rc=$?
  tail -5 "$OUT/$tag.log"
  python3 scripts/profile_top.py "$OUT/$tag.prof" --results "$OUT/run-$tag" -n 45 > "$OUT/profile-$tag.json"
  rm -rf "$OUT/run-$tag" "$OUT/$tag.prof"
  exit $rc
fi
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(gemma4-text-tiny gemma4-text-tiny-bf16 gemma4-26b-a4b)
python3 scripts/gpu_run.py "${cases[@]}" --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
