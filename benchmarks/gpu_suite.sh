#!/usr/bin/env bash
# THE script for a GPU machine: build the extension, run the cuda tests, the CUDA-graph /
# torch.compile checks, compute-sanitizer and the benchmarks; logs + JSON + plots to one
# folder, a digest of the results at the end of stdout and of summary.txt.
#
# ---- With the device tool: 15 min of device time a session, the machine's start (~1-2 min)
# and idle time included, <= 10 min a call, no start with < 4 min left. So one full call
# (~9 min of suite time, plan 4 after kernel changes) and, if it ended early, a rerun on
# the still-warm machine (30 s) or a short second call; give_back after the last.
# Here, once:   bash tools/fetch_wheels.sh      # wheelhouse/: flow_matching + POT (cp312), ~32 MB
# The plans (each ~9 min of suite time; 1-3 were written for 30-min sessions, one a session):
#   1 correctness  run(command="OTQ_SUITE_PLAN=1 OTQ_GIT_SHA=<sha> bash benchmarks/gpu_suite.sh",
#                      carry=["wheelhouse"], timeout_s=600)
#                  env, wheels, build, pytest -m cuda, graph+compile checks, compute-sanitizer,
#                  then the Triton kernel tests on the GPU until the deadline
#   2 goal benches run(command="OTQ_SUITE_PLAN=2 OTQ_GIT_SHA=<sha> bash benchmarks/gpu_suite.sh",
#                      carry=["wheelhouse"], timeout_s=600)
#                  env, wheels, build, issue 6's goal grids: linear 8192x8192 + 14336x4096,
#                  M 1/16/256/1024, bits 4/2/3/8 (goal/linear.json); e2e mnist UNet batch 1
#                  (goal/e2e.json); the UNet's 3x3 convs at batch 1 (goal/conv.json); plots
#   3 optional     OTQ_SUITE_PLAN=3 (same form): fit throughput, linear crossovers on UNet
#                  shapes (+ tuning.json), conv at batch 8/64, e2e at batch 16/64, the whole
#                  pytest suite until the deadline. A call costs its suite time + ~1-2 min of
#                  machine start; with L minutes of device time left (status), add
#                  OTQ_SUITE_DEADLINE_S=$(( (L - 3) * 60 )) (max 530) and skip it below ~7 min.
#   4 after a kernel change (one ~9 min call, no wheels needed): OTQ_SUITE_PLAN=4 runs
#                  env, build, tests_kernels (CUDA kernel, fit, UNet, layer, dispatch-log tests), goal_linear_graph
#                  (CUDA kernels + dequant at M 1/2/4/8/12/16/32/64 and the expansion alone,
#                  graph replays: goal_graph/), goal_conv_graph (the 3x3 and 1x1 convs at
#                  batch 1, 4-bit, graph replays), goal_e2e, goal_e2e_tuned (the tuning those
#                  replays earn, goal_tuned/tuning.json, and the e2e goal under it where it
#                  differs from the shipped one), goal_linear_large_m (Triton gemm and
#                  gemm_tile at M = 256, 1024: goal_large_m/linear.json), then the
#                  diagnostics: profile_e2e (kernel time of a batch-1 UNet step by
#                  category: e2e_profile.json), sweep_splitk (the LUT GEMV and lut_mma over
#                  forced split-K: splitk.json, splitk_mma.json), ncu_gemv (Nsight Compute
#                  on 4 GEMV launches, lut_mma and lut_frag at M = 16 and 1, lut_frag at 2,
#                  3 and 8 bits too and at M = 16 per tensor in 16- and 32-row blocks,
#                  and lut_conv at 28x28 and 7x7; lut_mma's and lut_frag's memory tables
#                  raw in logs/ncu_mma_raw.csv), goal_e2e_cl
#                  (fp16, 4-bit cuda and auto with the model and input channels-last:
#                  goal_channels_last/e2e.json). The goal measurements come first: a
#                  deadline (by count ~580 s for all of it) cuts the last steps.
# A machine stays warm 30 s after a call: a call made within that time reuses the build
# and Triton's compile cache (/tmp/otq_triton_cache) and starts at once.
# <sha> = `git rev-parse HEAD` written out literally (the machine gets no .git); every JSON
# also records tree_hash (`python benchmarks/common.py --tree-hash` here gives the same).
# What comes back (files_at): summary.txt (step status, error tails, results digest,
# with times against benchmarks/results/<gpu-slug>/ where this GPU has results),
# suite.tar.gz (everything: `tar -xzf suite.tar.gz -C benchmarks/results/`) and up to 6
# JSON files (goal_graph_linear.json, goal_graph_conv.json, goal_tuning.json,
# goal_linear.json, goal_e2e.json, goal_conv.json, checks.json, ...; the first six found).
# A failed build ends the GPU steps (FAILED, not run), leaving the device time for a rerun.
#
# usage: bash benchmarks/gpu_suite.sh [OUTDIR]     (-h, --help: this text)
#   OUTDIR default: benchmarks/results/<gpu-slug>/; when $OUT is set (the device tool) the
#   work happens in /tmp/otq_suite/<gpu-slug>/ and $OUT receives the files above after
#   every step (a call killed at its limit still returns what was done).
# env:
#   OTQ_SUITE_PLAN        1, 2, 3 or 4 (above); unset: every step in priority order
#   OTQ_SUITE_STEPS       explicit step list, overrides the plan (names: see ALL_STEPS)
#   OTQ_SUITE_DEADLINE_S  wall-clock budget for the whole suite (default 530 s with $OUT,
#                         else 7200); each step gets min(its cap, what is left) and stops
#                         itself inside that (benches: --budget-s; pytest: a deadline plugin)
#   OTQ_SUITE_CAP_SCALE   multiply every step's cap (default 1; e.g. 4 on a machine of your own)
#   OTQ_TEST_AUTOTUNE_MAX_CONFIGS   Triton configs tried per autotune key in tests, checks and
#                         the sanitizer run (default 1: no autotune benchmarking)
#   OTQ_BENCH_AUTOTUNE_MAX_CONFIGS  the same for the benchmarks (default 4; 0 = no limit)
#   OTQ_AUTOTUNE_REP_MS   ms of timing per autotune config (default 20; Triton's own is 125)
#   OTQ_WHEELS            folder of carried wheels (default wheelhouse/)
#   OTQ_GIT_SHA           recorded in the JSON meta when the tree has no .git
#   OTQ_SUITE_TEST_FILTER pytest -k expression for tests_kernels (default: not long_rows_on_gpu;
#                         e.g. mma: one kernel's tests)
#   OTQ_SUITE_NCU_KERNELS kernel-name regex for ncu_gemv (default
#                         lut_gemv_kernel|lut_mma_kernel|lut_frag_kernel|lut_conv_kernel)
#   OTQ_SUITE_SCRATCH     where the work happens when $OUT is set (default /tmp/otq_suite)
#   PYTHON                interpreter (default python3: the image's, which holds torch)
# A failing step is logged in summary.txt with the tail of its log and the suite goes on.
# CI parses every bench command line below (tests/test_benchmarks_smoke.py; the benches
# check their list options' values at parse time): a refused flag fails there, not here.
# Where torch sees no CUDA device (or fails to import), every step but CPU_STEPS is marked
# FAILED with the reason, without running, so that a broken driver never reads as
# "tests_cuda: ok, all skipped".
set -uo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_suite: unknown option $1 (usage: bash benchmarks/gpu_suite.sh [OUTDIR])" >&2
      exit 2 ;;
esac
[ $# -le 1 ] || { echo "gpu_suite: one OUTDIR at most, got $#: $*" >&2; exit 2; }
cd "$(dirname "$0")/.."
REPO=$(pwd)
T0=$(date +%s)
if [ -n "${OUT:-}" ]; then DEADLINE=${OTQ_SUITE_DEADLINE_S:-530}; else DEADLINE=${OTQ_SUITE_DEADLINE_S:-7200}; fi
CAP_SCALE=${OTQ_SUITE_CAP_SCALE:-1}
PY=${PYTHON:-python3}
WHEELS=${OTQ_WHEELS:-wheelhouse}
TEST_AT=${OTQ_TEST_AUTOTUNE_MAX_CONFIGS:-1}
BENCH_AT=${OTQ_BENCH_AUTOTUNE_MAX_CONFIGS:-4}
AT_REP=${OTQ_AUTOTUNE_REP_MS:-20}
SITE=/tmp/otq_site
PLAN1="env wheels build tests_cuda checks sanitizer tests_gpu"
PLAN2="env wheels build goal_linear goal_e2e goal_conv plot"
PLAN3="env wheels build bench_fit bench_linear bench_conv bench_e2e tests_all"
PLAN4="env build tests_kernels goal_linear_graph goal_conv_graph goal_e2e goal_e2e_tuned goal_linear_large_m profile_e2e sweep_splitk ncu_gemv goal_e2e_cl"
ALL_STEPS="env wheels build tests_cuda tests_kernels checks sanitizer goal_linear goal_linear_graph goal_conv_graph goal_e2e goal_e2e_tuned goal_linear_large_m profile_e2e sweep_splitk ncu_gemv goal_e2e_cl goal_conv plot tests_gpu bench_fit bench_linear bench_conv bench_e2e tests_all"
CPU_STEPS=" env wheels build plot plot_more tests_all "  # every other step needs the GPU
case "${OTQ_SUITE_PLAN:-}" in
  1) PLAN_STEPS=$PLAN1 ;; 2) PLAN_STEPS=$PLAN2 ;; 3) PLAN_STEPS=$PLAN3 ;; 4) PLAN_STEPS=$PLAN4 ;;
  "") PLAN_STEPS=$ALL_STEPS ;;
  *) echo "gpu_suite: OTQ_SUITE_PLAN must be 1, 2, 3 or 4" >&2; exit 2 ;;
esac
STEPS=" ${OTQ_SUITE_STEPS:-$PLAN_STEPS} "
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/otq_triton_cache}
ARGC=$#

SLUG_ERR=$(mktemp)
slug=$($PY - <<'EOF' 2>"$SLUG_ERR" || echo unknown
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
)
case "$slug" in  # NO_GPU: why the GPU steps cannot run, empty when they can
  cpu) NO_GPU="torch sees no CUDA device" ;;
  unknown) NO_GPU="torch failed: $(grep -v '^[[:space:]]' "$SLUG_ERR" | tail -n 1)" ;;
  *) NO_GPU="" ;;
esac
rm -f "$SLUG_ERR"
if [ $# -ge 1 ]; then
  DIR=$1
elif [ -n "${OUT:-}" ]; then
  DIR=${OTQ_SUITE_SCRATCH:-/tmp/otq_suite}/$slug
else
  DIR=benchmarks/results/$slug
fi
[ -n "${OUT:-}" ] && [ $# -lt 1 ] && rm -rf "$DIR"   # our scratch folder: start clean
mkdir -p "$DIR/logs" "$DIR/goal"
DIR=$(cd "$DIR" && pwd)
SUMMARY=$DIR/summary.txt
echo "gpu_suite: $(date -u +%FT%TZ) slug=$slug plan=${OTQ_SUITE_PLAN:-all} dir=$DIR" \
  "deadline=${DEADLINE}s git_sha=${OTQ_GIT_SHA:-?} steps=[$STEPS]" | tee "$SUMMARY"
[ -n "$NO_GPU" ] && echo "gpu_suite: WARNING $NO_GPU (slug=$slug): the GPU steps will not run" \
  | tee -a "$SUMMARY"

elapsed() { echo $(( $(date +%s) - T0 )); }

# pytest's last line ("3 failed, 120 passed, 2 skipped in 41.2s", "no tests ran in ..")
PYTEST_END='^(=+ )?(([0-9]+ [a-z]+(, )?)+|no tests ran) in [0-9.]+s|^!+ Interrupted'


in_list() { case "$2" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }  # WORD " LIST "
wanted() { in_list "$1" "$STEPS"; }

# Copy the results to $OUT (the device tool brings back at most 8 files of <= 16 MB).
export_out() {
  [ -n "${OUT:-}" ] && [ "$ARGC" -lt 1 ] || return 0
  cp "$SUMMARY" "$OUT/summary.txt" 2>/dev/null
  local n=0 src dst
  for pair in goal_graph/linear.json:goal_graph_linear.json \
              goal_graph/conv.json:goal_graph_conv.json goal_tuned/tuning.json:goal_tuning.json \
              goal/linear.json:goal_linear.json goal/e2e.json:goal_e2e.json \
              goal/conv.json:goal_conv.json checks.json:checks.json fit.json:fit.json \
              linear.json:linear.json e2e.json:e2e.json conv.json:conv.json \
              tuning.json:tuning.json splitk.json:splitk.json \
              e2e_profile.json:e2e_profile.json; do
    src=${pair%%:*} dst=${pair##*:}
    if [ -f "$DIR/$src" ] && [ $n -lt 6 ]; then cp "$DIR/$src" "$OUT/$dst" && n=$((n + 1)); fi
  done
  tar -czf "$OUT/suite.tar.gz.tmp" -C "$(dirname "$DIR")" "$(basename "$DIR")" 2>/dev/null
  if [ "$(stat -c %s "$OUT/suite.tar.gz.tmp" 2>/dev/null || echo 0)" -gt 15000000 ]; then
    # logs grew too large (e.g. compiler dumps): keep the last 1 MB of each
    local tmp=/tmp/otq_suite_small
    rm -rf "$tmp" && mkdir -p "$tmp" && cp -r "$DIR" "$tmp/"
    for f in "$tmp/$(basename "$DIR")"/logs/*; do
      [ -f "$f" ] && tail -c 1000000 "$f" > "$f.t" && mv "$f.t" "$f"
    done
    tar -czf "$OUT/suite.tar.gz.tmp" -C "$tmp" "$(basename "$DIR")" 2>/dev/null
  fi
  mv -f "$OUT/suite.tar.gz.tmp" "$OUT/suite.tar.gz"
}

# run_step NAME CAP_S COMMAND: run COMMAND (a bash string; $STEP_BUDGET = seconds it may
# use, $DIR, $PY) under timeout, log to logs/NAME.log, record the outcome with the log's
# tail in summary.txt, never abort the suite.
run_step() {
  local name=$1 cap=$(( $2 * CAP_SCALE )) cmd=$3
  wanted "$name" || return 0
  LAST_RC=0
  if [ -n "$NO_GPU" ] && ! in_list "$name" "$CPU_STEPS"; then
    echo "$name: FAILED (not run: $NO_GPU)" | tee -a "$SUMMARY"
    return 0
  fi
  local left=$(( DEADLINE - $(elapsed) - 15 ))
  if [ "$left" -lt 25 ]; then
    echo "$name: SKIPPED (suite deadline: $(elapsed)s of ${DEADLINE}s used)" | tee -a "$SUMMARY"
    return 0
  fi
  local t=$(( cap < left ? cap : left )) start=$(date +%s)
  echo "[$(elapsed)s] $name: start (limit ${t}s)"
  STEP_BUDGET=$(( t * 8 / 10 )) DIR="$DIR" PY="$PY" \
    timeout -k 10 "$t" bash -c "$cmd" >"$DIR/logs/$name.log" 2>&1
  local rc=$? status=ok
  LAST_RC=$rc
  [ $rc -ne 0 ] && status="FAILED rc=$rc"
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status="TIMEOUT after ${t}s (killed)"
  local log=$DIR/logs/$name.log
  if [ $rc -eq 2 ] && grep -q "OTQ_PYTEST_DEADLINE reached" "$log" \
      && ! grep -q -E "^(FAILED|ERROR) " "$log"; then
    status="PARTIAL: no failure, stopped at the step's deadline"
  fi
  {
    echo "$name: $status ($(( $(date +%s) - start ))s, log logs/$name.log)"
    if grep -q -E "$PYTEST_END" "$log"; then  # pytest: failures, then its last line
      grep -E "^(FAILED|ERROR) " "$log" | head -n 25 | cut -c1-300 | sed 's/^/    /'
      grep -E "$PYTEST_END" "$log" | tail -n 2 | sed 's/^/    /'
    elif [ $rc -ne 0 ]; then
      grep -v '^\s*$' "$log" | tail -n 20 | cut -c1-400 | sed 's/^/    | /'
    else
      grep -v '^\s*$' "$log" | tail -n 2 | cut -c1-300 | sed 's/^/    /'
    fi
  } | tee -a "$SUMMARY"
  export_out
}

finish() {
  [ -n "${DMON_PID:-}" ] && kill "$DMON_PID" 2>/dev/null
  echo "gpu_suite: done in $(elapsed)s" | tee -a "$SUMMARY"
  # times against this GPU's committed results (what moved since the last run), if any
  local committed=$REPO/benchmarks/results/$slug against=""
  [ -d "$committed" ] && [ "$(cd "$committed" && pwd)" != "$DIR" ] && against=$committed
  $PY benchmarks/digest.py "$DIR" ${against:+--against "$against"} 2>&1 | tee -a "$SUMMARY"
  export_out
}
trap finish EXIT

# clocks, power and temperature every 5 s while the suite runs (throttling shows up here)
if command -v nvidia-smi >/dev/null; then
  nvidia-smi dmon -s pucm -d 5 -c $(( DEADLINE / 5 + 12 )) >"$DIR/logs/dmon.log" 2>&1 &
  DMON_PID=$!
fi

TEST_ENV="export OTQ_AUTOTUNE_MAX_CONFIGS=$TEST_AT OTQ_AUTOTUNE_REP_MS=$AT_REP"
BENCH_ENV="export OTQ_AUTOTUNE_MAX_CONFIGS=$BENCH_AT OTQ_AUTOTUNE_REP_MS=$AT_REP"
# pytest on the GPU: Triton autotune capped, stops itself at the step's budget (gpu_limits)
# and, with pytest-timeout, a test past 90 s fails (so one slow test cannot eat the step)
PYTEST="$TEST_ENV"'; export OTQ_PYTEST_DEADLINE=$(( $(date +%s) + STEP_BUDGET ));
  per_test=$($PY -c "import pytest_timeout" 2>/dev/null && echo --timeout=90)
  PYTHONPATH="$PYTHONPATH:'"$REPO"'/benchmarks" $PY -m pytest -p gpu_limits -p no:cacheprovider \
    -q -ra --durations=15 $per_test'

# -- steps ------------------------------------------------------------------------------
run_step env 40 '
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  $PY -c "import torch; print(torch.cuda.get_device_properties(0))"
  $PY -c "import sysconfig, os; h = os.path.join(sysconfig.get_paths()[\"include\"], \"Python.h\"); print(\"Python.h\", h, os.path.exists(h))"
  echo "git_sha ${OTQ_GIT_SHA:-unset}"
  command -v nvcc ninja compute-sanitizer ncu nsys; nvcc --version | tail -n 2; ninja --version
  compute-sanitizer --version | head -n 2
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|triton|numpy|scipy|flow.matching|torchdiffeq|pot|safetensors|hypothesis|tqdm|pytest|pytest-timeout|setuptools|pybind11|ninja|matplotlib|scikit-learn|scikit-image|torchmetrics) "
  uname -a; free -g; df -h /tmp | tail -n 1
  echo "$(nproc) CPUs, tree_hash $($PY benchmarks/common.py --tree-hash)"
  $PY -c "import sys, torch, triton; print(\"python\", sys.version.split()[0], sys.executable, \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)"'
cp "$DIR/logs/env.log" "$DIR/env.txt" 2>/dev/null

# wheels: install the carried wheels this interpreter lacks, by name, offline, into $SITE
# (never torch/triton: --no-deps, and only the packages pip show does not find)
run_step wheels 90 '
  shopt -s nullglob
  whls=('"$WHEELS"'/*.whl)
  if [ ${#whls[@]} -eq 0 ]; then echo "no wheels carried in '"$WHEELS"'/ (tests needing flow_matching/POT will skip or fail)"; exit 0; fi
  names=$(for w in "${whls[@]}"; do basename "$w" | cut -d- -f1; done | sort -u)
  bad=0
  for name in $names; do
    if $PY -m pip show -q "$name" >/dev/null 2>&1; then echo "$name: already installed, not touched"; continue; fi
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --find-links '"$WHEELS"' --target '"$SITE"' "$name"; then echo "$name: installed"
    else echo "$name: FAILED (no wheel for this Python/platform in '"$WHEELS"'/?)"; bad=1; fi
  done
  rm -rf '"$SITE"'/tests   # flow_matching ships its own top-level tests package
  PYTHONPATH="$PYTHONPATH:'"$SITE"'" $PY -c "import importlib.metadata as m, flow_matching, ot; print(\"importable: flow_matching\", m.version(\"flow_matching\"), \"POT\", m.version(\"POT\"))" || bad=1
  exit $bad'
[ -d "$SITE" ] && export PYTHONPATH="$PYTHONPATH:$SITE"   # for every later step

# build in place (PYTHONPATH=$REPO finds it; nothing installed into the image), sm_90 only,
# CUDA sources forced so that a missing nvcc is an error, not a silent CPU-only build
run_step build 240 '
  export OTQ_CUDA_ARCHS=${OTQ_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} OTQ_FORCE_CUDA=1
  [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
  export PATH="$(dirname "$(command -v $PY)"):$PATH"   # ninja of the same environment
  $PY setup.py build_ext --inplace || exit 1
  $PY -c "import otq_kernels._C as c; print(\"extension:\", c.__file__, \"WITH_CUDA =\", c.WITH_CUDA); assert c.WITH_CUDA, \"built without CUDA\""'
# without the extension every later GPU step would time or test the rest only: end early,
# so that the device time left can go to a run after the fix
if wanted build && [ "$LAST_RC" -ne 0 ] && [ -z "$NO_GPU" ]; then
  NO_GPU="the build failed (logs/build.log)"
  echo "gpu_suite: WARNING $NO_GPU: the GPU steps will not run" | tee -a "$SUMMARY"
fi

run_step tests_cuda 150 "$PYTEST"' -m cuda --junitxml="$DIR/logs/pytest_cuda.xml" tests'

# the CUDA kernel tests, the fit tests, the UNet's (fused attention), CUDA-graph
# replays of a quantized UNet (CudaGraphed), a meta skeleton's load onto the GPU and the
# layers under torch.autocast only (a quick
# re-check after a kernel change), without the three long-row fit tests (~60 s together;
# tests_cuda runs them), so that the step finishes inside its cap
run_step tests_kernels 160 "$PYTEST"' -m cuda --junitxml="$DIR/logs/pytest_kernels.xml" \
    -k "${OTQ_SUITE_TEST_FILTER:-not long_rows_on_gpu}" \
    tests/backends/test_cuda_backend.py tests/backends/test_triton_fit.py \
    tests/models/test_unet.py tests/test_graphs.py tests/test_skeleton.py tests/test_nn.py \
    tests/test_streaming.py tests/test_dispatch_log.py'

run_step checks 150 "$TEST_ENV"'
  $PY benchmarks/gpu_checks.py --out "$DIR"'

run_step sanitizer 200 "$TEST_ENV"'
  if ! command -v compute-sanitizer >/dev/null; then echo "compute-sanitizer not found"; exit 0; fi
  # one cudaMalloc per tensor, so that memcheck sees writes past a tensor (the caching
  # allocator would hide them inside its pooled blocks)
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  # API errors that torch/cuBLAS provoke and handle themselves are not kernel bugs
  api=(); compute-sanitizer --help 2>&1 | grep -q -- --report-api-errors && api=(--report-api-errors no)
  compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 "${api[@]}" \
    $PY benchmarks/gpu_checks.py --sanitizer-target'

run_step goal_linear 190 "$BENCH_ENV"'
  $PY benchmarks/bench_linear.py --preset goal --out "$DIR/goal" --budget-s "$STEP_BUDGET" --quiet'

# the fused CUDA kernels at small M as CUDA-graph replays: GPU time without the host's
# per-call launch path (which the eager timing above includes once it outlasts the flush).
# M 2, 4 and 8 too: the crossovers that --tuning-from derives (LUT GEMV / lut_mma per bit
# width, cuda / dequant) lie between 1 and 16; 32 and 64 (the CUDA kernels in 2-8 launches):
# whether cuda_max_m may pass 16, where dispatch now sends every M to dequant. --expand:
# the dequant path's expansion kernel alone, on session 44's grid and on the earlier one
run_step goal_linear_graph 150 "$BENCH_ENV"'
  $PY benchmarks/bench_linear.py --preset goal --graph --ms 1,2,4,8,12,16,32,64 \
    --backends cuda,dequant --expand \
    --out "$DIR/goal_graph" --budget-s "$STEP_BUDGET" --quiet'

# the UNet's 3x3 convs at batch 1 as CUDA-graph replays (4-bit, both codebook kinds):
# kernel time without the per-call host time that dominated the eager goal_conv rows;
# its 1x1 convs too (3 shapes, after the 3x3 ones), so that --tuning-from can give
# them a conv2d entry of their own (kernel_sizes, *_max_m_by_kernel)
run_step goal_conv_graph 100 "$BENCH_ENV"'
  $PY benchmarks/bench_conv.py --preset goal --graph --bits 4 --include-1x1 \
    --out "$DIR/goal_graph" --budget-s "$STEP_BUDGET" --quiet'

run_step goal_e2e 110 "$BENCH_ENV"'
  $PY benchmarks/bench_e2e.py --preset goal --out "$DIR/goal" --budget-s "$STEP_BUDGET" --quiet'

# the dispatch tuning that this run's graph replays earn (--tuning-from, as the session
# after would derive it) and, where it dispatches differently from the shipped table, the
# e2e goal under it (fp16 and 4-bit per channel auto; meta.tuning says what it read)
# (a derivation that fails fails the step, after the e2e goal under what the other gave)
run_step goal_e2e_tuned 70 "$BENCH_ENV"'
  T="$DIR/goal_tuned/tuning.json"; mkdir -p "$DIR/goal_tuned"; failed=0
  $PY benchmarks/bench_linear.py --tuning-from "$DIR/goal_graph/linear.json" --write-tuning "$T" || failed=1
  if [ -f "$DIR/goal_graph/conv.json" ]; then
    $PY benchmarks/bench_conv.py --tuning-from "$DIR/goal_graph/conv.json" --write-tuning "$T" || failed=1
  fi
  [ -f "$T" ] || exit 1
  $PY benchmarks/derive.py --tuning-changes "$T"; changes=$?   # 1: none, 2: unreadable
  [ "$changes" -eq 1 ] && exit "$failed"
  [ "$changes" -eq 0 ] || exit "$changes"
  OTQ_TUNING_FILE="$T" $PY benchmarks/bench_e2e.py --preset goal \
    --variants fp16,4:channel:auto --out "$DIR/goal_tuned" --budget-s "$STEP_BUDGET" --quiet || exit 1
  exit "$failed"'

# Triton's GEMMs at M = 256 and 1024 (4-bit per channel, graph replays): gemm (one K = 16
# wgmma per field position, each waited for) against gemm_tile (whole K tiles, one
# tl.dot each) and dequant -> cuBLAS: issue 6's M >= 256 goal
run_step goal_linear_large_m 90 "$BENCH_ENV"'
  $PY benchmarks/bench_linear.py --preset goal --graph --ms 256,1024 --bits 4 \
    --granularity channel --backends triton,dequant --kernels gemm,gemm_tile \
    --out "$DIR/goal_large_m" --budget-s "$STEP_BUDGET" --quiet'

# kernel time of one batch-1 UNet step by category (GEMM, conv, ours, PyTorch's, ...):
# how much of the step the quantized layers can change at all
run_step profile_e2e 90 "$BENCH_ENV"'
  $PY benchmarks/profile_e2e.py --out "$DIR" --quiet'

# the LUT GEMV at M = 1 over forced split-K factors (graph replays), then Nsight Compute's
# view of four of its launches and one lut_mma launch at M = 16 (duration, occupancy,
# stall reasons, memory throughput)
run_step sweep_splitk 90 "$BENCH_ENV"'
  $PY benchmarks/sweep_splitk.py --out "$DIR" --budget-s $(( STEP_BUDGET / 2 )) --quiet
  $PY benchmarks/sweep_splitk.py --tensor-cores --ms 1,16 --bits 4,2,3 --splits 1,2,4 \
    --out "$DIR" --budget-s $(( STEP_BUDGET / 2 )) --quiet'

run_step ncu_gemv 120 '
  if ! command -v ncu >/dev/null; then echo "ncu not found"; exit 0; fi
  # the full set: stall reasons (sampled per instruction) and the source hot spots too
  ncu --kernel-name "regex:${OTQ_SUITE_NCU_KERNELS:-lut_gemv_kernel|lut_mma_kernel|lut_frag_kernel|lut_conv_kernel}" \
    --launch-count 30 --set full \
    $PY benchmarks/sweep_splitk.py --ncu-target
  # the lut_mma and lut_frag launches as raw metrics: the units behind the L1 throughput figure (the
  # speed-of-light breakdown) and the memory tables (L1 wavefronts, requests and sectors
  # per access type), which the details page above summarizes away: CSV lines (after the
  # ==PROF== lines of the tool) in logs/ncu_mma_raw.csv
  ncu --kernel-name "regex:lut_mma_kernel|lut_frag_kernel" --launch-count 18 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis_Tables --page raw --csv \
    --log-file "$DIR/logs/ncu_mma_raw.csv" $PY benchmarks/sweep_splitk.py --ncu-target'

# goal_e2e with the model and input channels-last (FP16 too): cuDNN's faster
# layout for these convs, and lut_conv's without its per-call copy of x
run_step goal_e2e_cl 90 "$BENCH_ENV"'
  $PY benchmarks/bench_e2e.py --preset goal --channels-last \
    --variants fp16,4:channel:cuda,4:channel:auto --out "$DIR/goal_channels_last" \
    --budget-s "$STEP_BUDGET" --quiet'

run_step goal_conv 100 "$BENCH_ENV"'
  $PY benchmarks/bench_conv.py --preset goal --out "$DIR/goal" --budget-s "$STEP_BUDGET" --quiet'

run_step plot 40 '
  $PY benchmarks/plot.py "$DIR/goal"; $PY benchmarks/plot.py "$DIR"'

run_step tests_gpu 400 "$PYTEST"' -m "not cuda" --junitxml="$DIR/logs/pytest_gpu.xml" \
    tests/backends/test_triton_linear.py tests/backends/test_triton_conv.py \
    tests/backends/test_triton_dequant.py tests/backends/test_triton_pack.py \
    tests/backends/test_triton_fit.py tests/test_ops.py tests/test_nn.py tests/backends/test_cpu_backend.py'

run_step bench_fit 70 "$BENCH_ENV"'
  $PY benchmarks/bench_fit.py --out "$DIR" --budget-s "$STEP_BUDGET" --quiet'

run_step bench_linear 200 "$BENCH_ENV"'
  $PY benchmarks/bench_linear.py --preset unet --out "$DIR" --budget-s "$STEP_BUDGET" --quiet \
    --write-tuning "$DIR/tuning.json"'

run_step bench_conv 110 "$BENCH_ENV"'
  $PY benchmarks/bench_conv.py --batches 8,64 --out "$DIR" --budget-s "$STEP_BUDGET" --quiet \
    --write-tuning "$DIR/tuning.json"'

run_step bench_e2e 110 "$BENCH_ENV"'
  $PY benchmarks/bench_e2e.py --batches 16,64 --out "$DIR" --budget-s "$STEP_BUDGET" --quiet'

if wanted bench_fit || wanted bench_linear || wanted bench_conv || wanted bench_e2e; then
  STEPS="$STEPS plot_more "  # the plots of these benches (the plot step ran before them)
  run_step plot_more 30 '$PY benchmarks/plot.py "$DIR"'
fi

run_step tests_all 400 "$PYTEST"' --junitxml="$DIR/logs/pytest_all.xml" tests'
