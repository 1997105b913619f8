#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc (they include no torch headers), when
# nvcc exists, and fail if ptxas reports a register spill in any kernel. Object files go
# to a temp dir and are discarded.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda-check: nvcc not found, skipping CUDA compile check"
  exit 0
fi
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "cuda-check: no CUDA sources"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
archs=${OTQ_CUDA_ARCHS:-80;90}
gencode=()
for a in ${archs//;/ }; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done
for src in "${sources[@]}"; do
  nvcc -std=c++17 -O2 -Icsrc "${gencode[@]}" -Xptxas -v -c "$src" \
    -o "$tmp/$(basename "$src").o" 2>"$tmp/ptxas.log" || { cat "$tmp/ptxas.log"; exit 1; }
  # Spills in our kernels on sm_90 (the H100/H200 this targets) fail; on other archs, and
  # in CUB's own sort kernels, they are reported.
  spills=$(awk '/Compiling entry function/ {arch = $NF; ours = ($0 !~ /_ZN3cub/)}
               /bytes spill/ && ($5 > 0 || $9 > 0) {print arch (ours ? "" : " (CUB)")}' \
           "$tmp/ptxas.log" | sort | uniq -c)
  if [ -n "$spills" ]; then
    echo "cuda-check: $src: spills (count, arch):" $spills
    if echo "$spills" | grep -q "sm_90'$"; then exit 1; fi
  fi
  regs=$(grep -Eo "Used [0-9]+ registers" "$tmp/ptxas.log" | awk '{print $2}' | sort -n | tail -1)
  echo "cuda-check: $src ok (none of our kernels spills on sm_90; at most ${regs:-0} registers)"
done
# The CUDA half of the bindings (OTQ_WITH_CUDA) is only built on GPU machines: syntax-check it.
py=${PYTHON:-.venv/bin/python}
if [ -x "$py" ] && inc=$("$py" -c "import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()['include'])" 2>/dev/null); then
  set -- $inc
  g++ -std=c++17 -fsyntax-only -DOTQ_WITH_CUDA -I"$1" -I"$2" -Icsrc csrc/bindings.cpp
  echo "cuda-check: csrc/bindings.cpp (OTQ_WITH_CUDA) ok"
fi
