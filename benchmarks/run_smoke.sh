#!/usr/bin/env bash
# Every benchmark in --smoke mode on CPU (tiny shapes, wall-clock timing: exercises the code
# paths only, no numbers to quote) into a temp dir, then the plots. Used by CI / `make bench-smoke`.
# usage: bash benchmarks/run_smoke.sh [OUTDIR]   (default: a fresh temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUTDIR=${1:-$(mktemp -d -t otq_smoke.XXXXXX)}
export TRITON_INTERPRET=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
for subject in linear conv fit e2e; do
  start=$(date +%s)
  "$PY" "benchmarks/bench_$subject.py" --smoke --device cpu --quiet --out "$OUTDIR"
  echo "smoke: bench_$subject ok ($(( $(date +%s) - start ))s)"
done
"$PY" benchmarks/plot.py "$OUTDIR"
echo "smoke: results in $OUTDIR"
