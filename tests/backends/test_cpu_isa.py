"""The CPU kernels' code built for each x86-64 instruction set level.

The extension builds the hot loops of csrc/cpu for AVX-512, AVX2 and the baseline and picks
one at load time (``OTQ_CPU_CLONES`` in csrc/cpu/decode.h), so the test suite, on one
machine, only runs one of them through ``otq_kernels._C``. Its LUT linear also switches, at
run time, to the register look-ups of csrc/cpu/lut_simd.h on AVX-512 or AVX2 when the CPU
has them (and its expansion to those of csrc/cpu/dequant_simd.h). Here the same sources are built
once per level without clones (``-march``, ``OTQ_NO_CPU_CLONES``; ``OTQ_NO_AVX512`` and
``OTQ_NO_AVX2`` for the three portable builds), and twice as the extension ships them,
baseline plus the run-time AVX2 path or plus both, and checked against the reference on the
same codes: the expansion bit-exact, the LUT GEMV to float32 rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cpu_flags import cpu_flags

import otq_kernels as otq
from otq_kernels.backends import reference

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "tests" / "cpu_isa" / "entry.cpp", ROOT / "csrc" / "cpu" / "dequant.cpp",
           ROOT / "csrc" / "cpu" / "lut_linear.cpp", ROOT / "csrc" / "cpu" / "lut_avx512.cpp",
           ROOT / "csrc" / "cpu" / "lut_avx2.cpp", ROOT / "csrc" / "cpu" / "dequant_avx512.cpp",
           ROOT / "csrc" / "cpu" / "dequant_avx2.cpp"]
HEADERS = sorted((ROOT / "csrc").glob("*.h")) + sorted((ROOT / "csrc" / "cpu").glob("*.h"))
PORTABLE = ("-DOTQ_NO_AVX512", "-DOTQ_NO_AVX2")
LEVELS = {"baseline": ("x86-64", PORTABLE), "avx2": ("x86-64-v3", PORTABLE),
          "avx512": ("x86-64-v4", PORTABLE), "avx2_lut": ("x86-64", ("-DOTQ_NO_AVX512",)),
          "avx512_lut": ("x86-64", ())}
NEEDS_FLAGS = {"baseline": (), "avx2": ("avx2", "fma", "bmi2"), "avx2_lut": ("avx2", "fma"),
               "avx512_lut": ("avx512f",),
               "avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl")}

# Set by test_kernels_clean_under_asan_and_ubsan for its rerun of this module's kernel
# tests on sanitized builds (in a process with libasan preloaded).
SANITIZED = os.environ.get("OTQ_CPU_ISA_SANITIZE") == "1"
SANITIZER_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                   "-fno-omit-frame-pointer", "-g")

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="instruction set levels are x86-64 ones")


def _build(level: str, out_dir: Path) -> Path:
    sanitize = SANITIZER_FLAGS if SANITIZED else ()
    digest = hashlib.sha256(" ".join((level, *sanitize)).encode())
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    target = out_dir / digest.hexdigest()[:16] / f"libotq_cpu_{level}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        cmd = [shutil.which("g++") or "g++", "-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared",
               f"-march={LEVELS[level][0]}", *LEVELS[level][1], "-DOTQ_NO_CPU_CLONES", *sanitize,
               f"-I{ROOT / 'csrc'}",
               *map(str, SOURCES), "-o", str(target)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return target


@pytest.fixture(scope="module", params=list(LEVELS))
def lib(request):
    level = request.param
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the CPU kernels")
    missing = [f for f in NEEDS_FLAGS[level] if f not in cpu_flags()]
    if missing:
        pytest.skip(f"this CPU lacks {missing} for the {level} build")
    library = ctypes.CDLL(str(_build(level, ROOT / "build" / "cpu_isa")))
    library.otq_isa_dequantize.restype = None
    library.otq_isa_lut_linear.restype = None
    return library


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _plane_array(qt):
    return (ctypes.c_size_t * len(qt.planes))(*(p.data_ptr() for p in qt.planes))


def _qt(n: int, k: int, bits: int, granularity: str):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 131 + k * 7 + bits))
    return otq.fit_codebook(w, bits=bits, granularity=granularity, backend="reference")


def _groups(qt) -> int:
    return qt.codebook.shape[0]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
# (the last shape is above kMinParallelWeights: rows shared among threads in chunks)
@pytest.mark.parametrize("n,k", [(1, 1), (5, 31), (17, 33), (4, 49), (40, 96), (3, 1000),
                                 (37, 450)])
def test_dequantize_bit_exact(lib, bits, granularity, n, k):
    qt = _qt(n, k, bits, granularity)
    out = torch.empty(n, k)
    lib.otq_isa_dequantize(_plane_array(qt), len(qt.planes), ctypes.c_int64(n),
                           ctypes.c_int64(k), bits, _ptr(qt.codebook),
                           ctypes.c_int64(_groups(qt)), _ptr(out))
    assert torch.equal(out, qt.dequantize(torch.float32))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
# (the first two are below kMinParallelMacs, run on one thread; the rest above it)
@pytest.mark.parametrize("m,n,k", [(1, 9, 127), (3, 4, 64), (16, 33, 45), (1, 7, 1537),
                                   (2, 5, 512), (5, 6, 1000), (17, 3, 545)])
def test_lut_linear_matches_reference(lib, bits, granularity, m, n, k):
    qt = _qt(n, k, bits, granularity)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + bits))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n))
    y = torch.empty(m, n)
    lib.otq_isa_lut_linear(_ptr(x), ctypes.c_int64(m), ctypes.c_int64(k), _plane_array(qt),
                           len(qt.planes), bits, _ptr(qt.codebook),
                           ctypes.c_int64(_groups(qt)), ctypes.c_int64(n), _ptr(bias), _ptr(y))
    truth = reference.linear(x.double(), qt, bias.double())
    # float32 summation in any order: |error| <= (k + 1) u sum_i |x_i w_i| (+ |bias|)
    magnitude = x.double().abs() @ qt.dequantize(torch.float64).abs().T + bias.double().abs()
    assert bool(((y.double() - truth).abs() <= (k + 1) * 2.0**-24 * magnitude).all())


@pytest.mark.skipif(SANITIZED, reason="this is the run under the sanitizers")
def test_kernels_clean_under_asan_and_ubsan():
    """The kernel tests above, rerun on ASan+UBSan builds of every level this CPU runs:
    every buffer is a tensor of its exact size, so a read or a write past one (an x column
    past K, a plane word past the row, a codebook entry past 2**bits) stops the run."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the CPU kernels")
    runtime = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
    if not Path(runtime).is_file():
        pytest.skip("libasan.so not installed")
    env = dict(os.environ, LD_PRELOAD=runtime, OTQ_CPU_ISA_SANITIZE="1",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "--capture=sys",
                           "-p", "no:cacheprovider",
                           __file__, "-k", "dequantize_bit_exact or lut_linear_matches"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    assert int(re.search(r"(\d+) passed", done.stdout)[1]) >= 2 * 7 * 7 * 2
