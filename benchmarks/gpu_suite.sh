#!/usr/bin/env bash
# THE script for a GPU machine: build the extension, run the cuda tests, the GPU checks,
# compute-sanitizer and every benchmark; write logs + JSON + plots to one folder.
#
# usage: bash benchmarks/gpu_suite.sh [OUTDIR]
#   OUTDIR default: benchmarks/results/<gpu-slug>/; when $OUT is set (the device tool) the
#   work happens in /tmp/otq_suite/<gpu-slug>/ and $OUT receives suite.tar.gz (everything:
#   extract with `tar -xzf suite.tar.gz -C benchmarks/results/`), summary.txt and the JSON
#   files (the tool returns at most 8 files).
# env:
#   OTQ_SUITE_STEPS       steps to run, in this order (default: all, see STEPS below)
#   OTQ_SUITE_DEADLINE_S  wall-clock budget for the whole suite (default 530 s); each step
#                         gets min(its cap, what is left); benches get --budget-s inside it
#   OTQ_WHEELS            folder of carried wheels (default wheelhouse/, see tools/fetch_wheels.sh)
#   OTQ_GIT_SHA           recorded in the JSON meta when the tree has no .git
#   PYTHON                interpreter (default python3)
# A failing step is logged in summary.txt and the suite goes on to the next one.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
T0=$(date +%s)
DEADLINE=${OTQ_SUITE_DEADLINE_S:-530}
PY=${PYTHON:-python3}
WHEELS=${OTQ_WHEELS:-wheelhouse}
ALL_STEPS="env wheels build tests_cuda bench_linear bench_conv bench_e2e bench_fit checks plot sanitizer tests_all"
STEPS=" ${OTQ_SUITE_STEPS:-$ALL_STEPS} "
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
ARGC=$#

slug=$($PY - <<'EOF' 2>/dev/null || echo unknown
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
)
if [ $# -ge 1 ]; then
  DIR=$1
elif [ -n "${OUT:-}" ]; then
  DIR=/tmp/otq_suite/$slug
else
  DIR=benchmarks/results/$slug
fi
mkdir -p "$DIR/logs"
DIR=$(cd "$DIR" && pwd)
SUMMARY=$DIR/summary.txt
echo "gpu_suite: $(date -u +%FT%TZ) slug=$slug dir=$DIR deadline=${DEADLINE}s steps=[$STEPS]" | tee "$SUMMARY"

elapsed() { echo $(( $(date +%s) - T0 )); }

wanted() { case "$STEPS" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_step NAME CAP_S COMMAND: run COMMAND (a bash string; $STEP_BUDGET = seconds it may
# use) under timeout, log to logs/NAME.log, record the outcome, never abort the suite.
run_step() {
  local name=$1 cap=$2 cmd=$3
  wanted "$name" || return 0
  local left=$(( DEADLINE - $(elapsed) - 20 ))
  if [ "$left" -lt 20 ]; then
    echo "$name: SKIPPED (suite deadline reached at $(elapsed)s)" | tee -a "$SUMMARY"
    return 0
  fi
  local t=$(( cap < left ? cap : left )) start=$(date +%s)
  STEP_BUDGET=$(( t * 8 / 10 )) DIR="$DIR" PY="$PY" \
    timeout -k 10 "$t" bash -c "$cmd" >"$DIR/logs/$name.log" 2>&1
  local rc=$? status=ok
  [ $rc -ne 0 ] && status="FAILED rc=$rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT after ${t}s"
  echo "$name: $status ($(( $(date +%s) - start ))s, log logs/$name.log)" | tee -a "$SUMMARY"
  tail -n 4 "$DIR/logs/$name.log" | sed 's/^/    /'
}

finish() {
  echo "gpu_suite: done in $(elapsed)s" | tee -a "$SUMMARY"
  if [ -n "${OUT:-}" ] && [ "$ARGC" -lt 1 ]; then
    tar -czf "$OUT/suite.tar.gz" -C "$(dirname "$DIR")" "$(basename "$DIR")"
    cp "$SUMMARY" "$OUT/"
    for f in linear conv fit e2e checks tuning; do
      [ -f "$DIR/$f.json" ] && cp "$DIR/$f.json" "$OUT/"
    done
  fi
}
trap finish EXIT

# -- steps ------------------------------------------------------------------------------
run_step env 30 '
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch, sys; print(\"python\", sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version()); print(torch.cuda.get_device_properties(0))"
  $PY -c "import triton; print(\"triton\", triton.__version__)"
  nvcc --version; compute-sanitizer --version | head -n 2
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|flow.matching|torchdiffeq|pot|safetensors|hypothesis|tqdm|pytest) "
  uname -a; nproc; free -g' 
cp "$DIR/logs/env.log" "$DIR/env.txt" 2>/dev/null

if wanted wheels; then  # in this shell: PYTHONPATH must reach the later steps
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/otq_site "$WHEELS"/*.whl >"$DIR/logs/wheels.log" 2>&1; then
      export PYTHONPATH="$PYTHONPATH:/tmp/otq_site"
      echo "wheels: ok ($(ls "$WHEELS"/*.whl | wc -l) wheels -> /tmp/otq_site)" | tee -a "$SUMMARY"
    else
      echo "wheels: FAILED (logs/wheels.log)" | tee -a "$SUMMARY"
    fi
  else
    echo "wheels: none carried in $WHEELS/ (tests needing flow_matching/pot will skip or fail)" | tee -a "$SUMMARY"
  fi
fi

run_step build 240 '
  export OTQ_CUDA_ARCHS=${OTQ_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
  $PY setup.py build_ext --inplace || $PY -m pip install --no-build-isolation --no-deps -e .
  $PY -c "import otq_kernels._C as c; print(\"extension:\", c.__file__, \"WITH_CUDA =\", getattr(c, \"WITH_CUDA\", None))"'

run_step tests_cuda 120 '
  $PY -m pytest -m cuda -q -p no:cacheprovider --junitxml="$DIR/logs/pytest_cuda.xml" tests'

run_step bench_linear 170 '
  $PY benchmarks/bench_linear.py --out "$DIR" --budget-s "$STEP_BUDGET" --quiet \
    --write-tuning "$DIR/tuning.json"'

run_step bench_conv 80 '
  $PY benchmarks/bench_conv.py --out "$DIR" --budget-s "$STEP_BUDGET" --quiet \
    --write-tuning "$DIR/tuning.json"'

run_step bench_e2e 100 '
  $PY benchmarks/bench_e2e.py --out "$DIR" --budget-s "$STEP_BUDGET" --quiet'

run_step bench_fit 70 '
  $PY benchmarks/bench_fit.py --out "$DIR" --budget-s "$STEP_BUDGET" --quiet'

run_step checks 120 '
  $PY benchmarks/gpu_checks.py --out "$DIR"'

run_step plot 40 '
  $PY benchmarks/plot.py "$DIR"'

run_step sanitizer 150 '
  if ! command -v compute-sanitizer >/dev/null; then echo "compute-sanitizer not found"; exit 0; fi
  compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    $PY benchmarks/gpu_checks.py --sanitizer-target'

run_step tests_all 240 '
  $PY -m pytest -q -p no:cacheprovider --junitxml="$DIR/logs/pytest_all.xml" tests'
