#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc (they include no torch headers), when
# nvcc exists, and fail if ptxas reports a register spill in any kernel. Then build the
# extension's CUDA variant as the GPU machine's build would (bindings with OTQ_WITH_CUDA,
# the CPU sources, these objects, cudart), and import it: a launcher the bindings call but
# no source defines, or a wrapper that passes it the wrong arguments
# (tools/check_native_calls.py), fails here, not in a GPU session. Objects go to a temp
# dir and are discarded.
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
py=${PYTHON:-.venv/bin/python}
archs=${OTQ_CUDA_ARCHS:-80;90}
gencode=()
for a in ${archs//;/ }; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done
# setup.py's nvcc flags, and the ones torch's CUDAExtension adds (no operators on
# __half/__nv_bfloat16, relaxed constexpr), read from the torch that builds the extension
if ! torch_flags=$("$py" -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(' '.join(f))" 2>/dev/null); then
  echo "cuda-check: torch not importable from $py; compiling without CUDAExtension's flags"
  torch_flags=""
fi
# shellcheck disable=SC2206
flags=($torch_flags -O3 -std=c++17 --use_fast_math -lineinfo -Xcompiler -fPIC -DOTQ_WITH_CUDA=1)
for src in "${sources[@]}"; do
  nvcc "${flags[@]}" -Icsrc "${gencode[@]}" -Xptxas -v -c "$src" \
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
# --use_fast_math makes a plain float<->double cast cvt.ftz, which flushes float32
# subnormals to zero: the fit (means in double, "nearest" codes) converts without it.
nvcc "${flags[@]}" -Icsrc -arch=sm_90 -ptx csrc/cuda/ot_binning.cu -o "$tmp/ot_binning.ptx"
if grep -Eq 'cvt(\.rn)?\.ftz\.f(32\.f64|64\.f32)' "$tmp/ot_binning.ptx"; then
  echo "cuda-check: ot_binning.cu converts float32<->float64 with .ftz (subnormals become 0)"
  exit 1
fi
echo "cuda-check: ot_binning.cu's float32<->float64 conversions keep subnormals (no .ftz)"
# The CUDA half of the bindings (OTQ_WITH_CUDA) is only built on GPU machines: build it
# here too (host code at -O0: only that it compiles, links and loads is checked).
if ! [ -x "$py" ] || ! inc=$("$py" -c "import pybind11, sysconfig; print(pybind11.get_include(), sysconfig.get_paths()['include'])" 2>/dev/null); then
  echo "cuda-check: no Python with pybind11 at $py; the CUDA bindings are not checked"
  exit 0
fi
set -- $inc
# the toolkit nvcc runs from (nvcc may be a wrapper script elsewhere)
cuda_home=${CUDA_HOME:-$(echo | nvcc --dryrun -x cu -c - -o /dev/null 2>&1 \
  | sed -n 's/^#\$ TOP=//p' | head -n 1)}
for src in csrc/bindings.cpp csrc/cpu/*.cpp; do
  g++ -std=c++17 -O0 -fPIC -fopenmp -DOTQ_WITH_CUDA=1 -I"$1" -I"$2" -Icsrc \
    -I"$cuda_home/include" -c "$src" -o "$tmp/$(basename "$src").o"
done
echo "cuda-check: csrc/bindings.cpp (OTQ_WITH_CUDA) and the CPU sources compile"
cudart=$(ls "$cuda_home"/lib64/libcudart.so "$cuda_home"/lib/libcudart.so 2>/dev/null | head -n 1 || true)
if [ -z "$cudart" ]; then
  echo "cuda-check: no libcudart.so under $cuda_home; the CUDA build is not linked"
  exit 0
fi
g++ -shared -fopenmp "$tmp"/*.o -L"$(dirname "$cudart")" -lcudart \
  -Wl,-rpath,"$(dirname "$cudart")" -o "$tmp/_C.so"
# Python loads extensions with every symbol bound at once: an undefined one fails here.
"$py" - "$tmp/_C.so" <<'EOF'
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("_C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.WITH_CUDA, "the OTQ_WITH_CUDA build says WITH_CUDA = False"
names = sorted(n for n in dir(module) if n.startswith("cuda_"))
print(f"cuda-check: the CUDA build links and imports ({len(names)} cuda_* functions)")
EOF
# and the package's calls of its cuda_* functions against their bound signatures
"$py" tools/check_native_calls.py "$tmp/_C.so" cuda_
