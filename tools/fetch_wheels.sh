#!/usr/bin/env bash
# Download the pure-Python wheels the GPU image lacks into wheelhouse/ (git-ignored via
# .git/info/exclude), so a session with a GPU can carry them (device tool: carry
# ["wheelhouse"]); benchmarks/gpu_suite.sh installs them with --no-index --target.
# The GPU image (torch 2.11, Python 3.12) already has torchdiffeq, safetensors, tqdm,
# hypothesis, numpy, scipy, scikit-learn, scikit-image, matplotlib, torchmetrics; it lacks
# flow_matching and POT (pot needs a manylinux wheel for cp312).
# usage: bash tools/fetch_wheels.sh [EXTRA_SPEC ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${OTQ_WHEELS:-wheelhouse}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
if [ -d .git ]; then
  mkdir -p .git/info
  grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
fi
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
COMMON=(download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$DEST")
# pure-Python (any platform)
$PIP "${COMMON[@]}" "flow_matching==1.0.10" "$@"
# compiled, needs the GPU machine's platform and Python
$PIP "${COMMON[@]}" "${PLATFORMS[@]}" "pot==0.9.7.post1" || \
  $PIP "${COMMON[@]}" "${PLATFORMS[@]}" pot
ls -la "$DEST"
