#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc (they include no torch headers), when
# nvcc exists. Object files go to a temp dir and are discarded.
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
  nvcc -std=c++17 -O2 -Icsrc "${gencode[@]}" -c "$src" -o "$tmp/$(basename "$src").o"
  echo "cuda-check: $src ok"
done
