#!/usr/bin/env bash
# Nightly parity run: the GPU suite with JUnit output, the report history kept across nights in a persistent
# directory, a verification card (YAML), and an exit status a scheduler can alert on.
#
#   bash scripts/nightly.sh [PYTEST ARGS ...]          e.g. bash scripts/nightly.sh -k "gemma4 and not checkpoint"
#
# Environment (all optional; docs/nightly/README.md):
#   PARITY_NIGHTLY_REPORTS  persistent report root, kept across nights   (default: $HOME/parity-nightly/reports)
#   PARITY_NIGHTLY_OUT      this night's artifacts: junit.xml, verification-card.yaml, pytest.log
#                           (default: $PARITY_NIGHTLY_REPORTS/nights/<UTC stamp>: inside the root, one artifact)
#   PARITY_DEVICE           --parity-device (default: cuda; a case that cannot run there is skipped, with why)
#   PYTHON                  interpreter (default: .venv/bin/python if present, else python3)
#   GEMMA4_CHECKPOINT       a local HF checkpoint folder: the checkpoint case runs too (else it skips)
#
# Exit status (the verification card's, plus pytest's own troubles):
#   0 every case that ran passed, nothing regressed against the previous night (skips are listed in the card)
#   1 a parity failure: a check failed, a run raised, a run folder is corrupt
#   2 no case ran: "no case ran: ..." lists every skip and its reason (e.g. no CUDA GPU here)
#   3 internal error of pytest
#   4 usage or setup error: bad options, an unwritable report root, a collection error, no JUnit written
#   5 a regression against the previous night (and no failure)
#   130 interrupted (Ctrl-C)
# The JUnit names are stable across nights and across -n N (test history); its report paths are relative to
# the report root.
set -uo pipefail
cd "$(dirname "$0")/.."
trap 'echo "nightly: interrupted" >&2; exit 130' INT TERM

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
REPORTS=${PARITY_NIGHTLY_REPORTS:-$HOME/parity-nightly/reports}
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
OUT=${PARITY_NIGHTLY_OUT:-$REPORTS/nights/$(date -u +%Y%m%dT%H%M%SZ)}
DEVICE=${PARITY_DEVICE:-cuda}
mkdir -p "$REPORTS" "$OUT" || { echo "nightly: cannot create $REPORTS or $OUT" >&2; exit 4; }

echo "nightly: $START  reports -> $REPORTS  artifacts -> $OUT  device $DEVICE"
"$PY" -m pytest parity -k gemma4 --parity-device "$DEVICE" --parity-reports "$REPORTS" \
  --junitxml "$OUT/junit.xml" -o junit_family=xunit2 -p no:cacheprovider -q "$@" 2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}

case "$tests" in
  0|1) ;;
  3) echo "nightly: pytest internal error (see $OUT/pytest.log)" >&2; exit 3 ;;
  5) echo "nightly: no case ran: no test collected (pytest arguments: $*)" >&2; exit 2 ;;
  *) echo "nightly: pytest could not run the suite: usage or collection error, exit $tests (see $OUT/pytest.log)" >&2
     exit 4 ;;
esac
if [ ! -f "$OUT/junit.xml" ]; then echo "nightly: pytest wrote no $OUT/junit.xml" >&2; exit 4; fi

"$PY" -m parity card --dir "$REPORTS" --since "$START" --junit "$OUT/junit.xml" \
  --out "$OUT/verification-card.yaml" --fail-on-regression
card=$?

echo "nightly: history $REPORTS/index.html · card $OUT/verification-card.yaml · junit $OUT/junit.xml"
if [ "$tests" -eq 1 ] || [ "$card" -eq 1 ]; then exit 1; fi   # a parity failure
case "$card" in
  0) exit 0 ;;
  2) exit 2 ;;                                                   # no case ran (the card said which were skipped)
  5) exit 5 ;;                                                   # a regression against the previous night
  *) echo "nightly: the verification card failed (exit $card)" >&2; exit 3 ;;
esac
