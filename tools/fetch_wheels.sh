#!/usr/bin/env bash
# Download the Python packages the offline GPU image lacks into wheelhouse/ (git-ignored),
# so a session with a GPU can carry them (device tool: carry ["wheelhouse"]);
# benchmarks/gpu_suite.sh installs them there by name, offline and without dependencies
# (`pip install --no-index --no-deps --find-links wheelhouse --target /tmp/otq_site NAME`),
# never touching the image's torch/triton.
#
# What the image lacks (/work/.library/device/KINDS.md, package list read 2026-11-17;
# python3 there is CPython 3.12.3): flow_matching (pure Python; the FM tests and the demo)
# and POT (`ot`, compiled: a cp312 manylinux wheel; the exact-EMD Wasserstein code and its
# tests, one of them marked `cuda`). Everything else the tests and benchmarks import is in
# the image: torchdiffeq, safetensors, tqdm, hypothesis, numpy, scipy, scikit-learn,
# scikit-image, matplotlib, torchmetrics, pytest, pybind11, ninja, setuptools.
# Size: ~33 MB (POT's wheel is 32.9 MB) + the tracked tree (~8 MB): under the 64 MiB that
# a call may carry. Wheels already present are not fetched again.
# usage: bash tools/fetch_wheels.sh [EXTRA_SPEC ...]   (extra pure-Python specs, if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${OTQ_WHEELS:-wheelhouse}
PIP=${PIP:-python3 -m pip}
PYVER=${OTQ_WHEEL_PYTHON:-3.12}   # the GPU image's python3
mkdir -p "$DEST"
if [ -d .git ]; then
  mkdir -p .git/info
  grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
fi
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64)
COMMON=(download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp
        -d "$DEST")
have() { compgen -G "$DEST/$1" >/dev/null; }
# pure Python (any platform)
have "flow_matching-1.0.10-*.whl" || $PIP "${COMMON[@]}" "flow_matching==1.0.10"
if [ $# -gt 0 ]; then $PIP "${COMMON[@]}" "$@"; fi
# compiled: the GPU machine's platform and Python
tag=cp${PYVER/./}
have "pot-0.9.7.post1-$tag-*.whl" || $PIP "${COMMON[@]}" "${PLATFORMS[@]}" "pot==0.9.7.post1"
ls -la "$DEST"
# one version per package (two wheels of one name would make pip's choice ambiguous)
dups=$(for w in "$DEST"/*.whl; do basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z'; done | sort | uniq -d)
[ -z "$dups" ] || echo "fetch_wheels: WARNING: several wheels of: $dups (keep one each)"
# what a device call carries: tracked files + untracked-not-ignored + wheelhouse <= 64 MiB
total=$( { git ls-files -z --cached --others --exclude-standard 2>/dev/null \
           | xargs -0 -r du -cb 2>/dev/null | tail -n 1 | cut -f1; } || echo 0)
wheels=$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)
echo "fetch_wheels: tree $((total / 1048576)) MiB + wheels $((wheels / 1048576)) MiB" \
     "= $(( (total + wheels) / 1048576 )) MiB of the 64 MiB a device call may carry"
if [ $(( total + wheels )) -gt $(( 60 * 1048576 )) ]; then
  echo "fetch_wheels: WARNING: over 60 MiB; the call may be refused" >&2
fi
