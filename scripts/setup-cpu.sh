#!/usr/bin/env bash
# Reproducible CPU setup (this machine, CI): .venv with torch 2.13 CPU, transformers 5.24 (reference
# version), megatron-core 0.19.2 (cp311 wheel, --ignore-requires-python), and this package in editable mode.
# Idempotent: a second call only checks. Python 3.11+.
#
# Opt-in: --with-megatron-bridge (or PARITY_WITH_MBRIDGE=1) also installs NVIDIA Megatron-Bridge 0.6.2
# (--no-deps, plus the pinned pure-Python packages of requirements-mbridge.txt), the second system under test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WITH_MBRIDGE=${PARITY_WITH_MBRIDGE:-0}
for arg in "$@"; do
  case "$arg" in
    --with-megatron-bridge) WITH_MBRIDGE=1 ;;
    *) echo "setup-cpu.sh: unknown argument $arg (known: --with-megatron-bridge)" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import parity.compat as c; c.apply(); import torch, transformers, megatron.core, peft" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -r requirements-cpu.txt
  .venv/bin/python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
  .venv/bin/python -m pip install -q --no-deps -e .
fi
if [ "$WITH_MBRIDGE" = "1" ]; then
  if ! .venv/bin/python -c "import sys; from parity import mbridge; ok, why = mbridge.available(); sys.exit(0 if ok and mbridge.version() == mbridge.TESTED_VERSION else 1)" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q -r requirements-mbridge.txt
    .venv/bin/python -m pip install -q --no-deps --ignore-requires-python megatron-bridge==0.6.2
  fi
  .venv/bin/python -c "import sys; from parity import mbridge; ok, why = mbridge.available(); print('megatron-bridge', mbridge.version(), file=sys.__stdout__) if ok else sys.exit('megatron-bridge: ' + why)" 2>/dev/null \
    || { echo "setup-cpu.sh: megatron-bridge does not import (run: .venv/bin/python -c 'from parity import mbridge; print(mbridge.available())')" >&2; exit 1; }
fi
.venv/bin/python -c "import parity.compat as c; c.apply(); import torch, transformers, megatron.core; print('torch', torch.__version__, '| transformers', transformers.__version__, '| megatron-core 0.19.2')"
