#!/usr/bin/env bash
# Reproducible CPU setup (this machine, CI): .venv with torch 2.13 CPU, transformers 5.24 (reference
# version), megatron-core 0.19.2 (cp311 wheel, --ignore-requires-python), and this package in editable mode.
# Idempotent: a second call only checks. Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import parity.compat as c; c.apply(); import torch, transformers, megatron.core" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -r requirements-cpu.txt
  .venv/bin/python -m pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
  .venv/bin/python -m pip install -q --no-deps -e .
fi
.venv/bin/python -c "import parity.compat as c; c.apply(); import torch, transformers, megatron.core; print('torch', torch.__version__, '| transformers', transformers.__version__, '| megatron-core 0.19.2')"
