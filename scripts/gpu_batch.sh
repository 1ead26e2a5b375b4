#!/usr/bin/env bash
# Several GPU measurements in one device call, each stage bounded by what is left of the call's time (stages that
# would not finish are not started): bash scripts/gpu_batch.sh LIMIT_S "STAGE" ["STAGE" ...]
# A STAGE is a command line run with the carried wheels on PYTHONPATH, e.g.
#   "python3 -m parity bench --case gemma4-26b-a4b --device cuda --system parity,megatron-bridge --out \$OUT/bench"
# Each stage's output goes to $OUT/stage-N.log (its last lines printed); the wheels are installed once. At the end
# everything under $OUT but stages.txt is packed into $OUT/results.tgz (a call brings back at most 8 files).
set -uo pipefail
limit=$1; shift
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
# byte-compiled before any stage, as installed packages are: a fresh lent machine's own torch and transformers come
# without it (a profiled 26B run compiled 3,679 modules from source, 6.2 s of its wall)
sys_site=$(python3 -c "import os, torch, transformers; print(os.path.dirname(os.path.dirname(torch.__file__)))")
t0=$SECONDS; python3 -m compileall -q -j 0 /tmp/site parity scripts "$sys_site/torch" "$sys_site/transformers" \
  >/dev/null 2>&1 || true; echo "byte-compiled in $((SECONDS - t0))s" | tee "$OUT/stages.txt"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
n=0
for stage in "$@"; do
  n=$((n + 1)); left=$((limit - SECONDS - 10))
  if [ $left -lt 60 ]; then echo "stage $n not started (${left}s left): $stage" | tee -a "$OUT/stages.txt"; continue; fi
  start=$SECONDS
  timeout "$left" bash -c "$stage" > "$OUT/stage-$n.log" 2>&1; rc=$?
  echo "stage $n rc $rc in $((SECONDS - start))s: $stage" | tee -a "$OUT/stages.txt"
  tail -8 "$OUT/stage-$n.log"
done
(cd "$OUT" && tar czf /tmp/results.tgz --exclude=stages.txt --exclude=results.tgz . && mv /tmp/results.tgz results.tgz \
  && find . -mindepth 1 -not -name stages.txt -not -name results.tgz -delete)
ls -la "$OUT"
