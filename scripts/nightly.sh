#!/usr/bin/env bash
# Nightly parity run: the GPU suite with JUnit output, the report history kept across nights in a persistent
# directory, a verification card (YAML), and an exit status a scheduler can alert on.
#
#   bash scripts/nightly.sh [PYTEST ARGS ...]          e.g. bash scripts/nightly.sh -k "gemma4 and not checkpoint"
#
# Environment (all optional):
#   PARITY_NIGHTLY_REPORTS  persistent report root, kept across nights   (default: $HOME/parity-nightly/reports)
#   PARITY_NIGHTLY_OUT      this night's artifacts: junit.xml, verification-card.yaml, log
#                           (default: $PARITY_NIGHTLY_REPORTS/../nights/<UTC stamp>)
#   PARITY_DEVICE           --parity-device (default: cuda)
#   PYTHON                  interpreter (default: .venv/bin/python if present, else python3)
#   GEMMA4_CHECKPOINT       a local HF checkpoint folder: the checkpoint case runs too (else it skips)
#
# Exit status: 0 every case passed and nothing regressed against the previous night; 1 a parity failure or a
# regression (see the card and reports/index.html); 2 bad usage / setup; other pytest statuses pass through
# (e.g. 5 = no test collected). The JUnit names are stable across nights and across -n N (test history).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
REPORTS=${PARITY_NIGHTLY_REPORTS:-$HOME/parity-nightly/reports}
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
OUT=${PARITY_NIGHTLY_OUT:-$(dirname "$REPORTS")/nights/$(date -u +%Y%m%dT%H%M%SZ)}
DEVICE=${PARITY_DEVICE:-cuda}
mkdir -p "$REPORTS" "$OUT" || { echo "nightly: cannot create $REPORTS or $OUT" >&2; exit 2; }

echo "nightly: $START  reports -> $REPORTS  artifacts -> $OUT  device $DEVICE"
"$PY" -m pytest parity -k gemma4 --parity-device "$DEVICE" --parity-reports "$REPORTS" \
  --junitxml "$OUT/junit.xml" -o junit_family=xunit2 -p no:cacheprovider -q "$@" 2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}

card=0
if [ -f "$OUT/junit.xml" ]; then
  "$PY" -m parity card --dir "$REPORTS" --since "$START" --junit "$OUT/junit.xml" \
    --out "$OUT/verification-card.yaml" --fail-on-regression
  card=$?
else
  echo "nightly: pytest wrote no $OUT/junit.xml" >&2
  card=2
fi

echo "nightly: history $REPORTS/index.html · card $OUT/verification-card.yaml · junit $OUT/junit.xml"
if [ "$tests" -ne 0 ]; then exit "$tests"; fi   # 1 = a parity check failed
if [ "$card" -eq 2 ]; then exit 2; fi           # the card could not be built (bad report dir or JUnit file)
if [ "$card" -ne 0 ]; then exit 1; fi           # a regression against the previous night (or no run at all)
exit 0
