"""Build csrc/cuda/*.cu with the host compiler against the stand-in CUDA headers in
tests/cuda_emulation/include, and call the launchers (csrc/cuda/launchers.h) through
ctypes on CPU tensors.

This runs the real kernel code (indexing, decoding, shared-memory tables, shuffles, split-K)
on the CPU, one std::thread per CUDA thread; it cannot show GPU-only faults such as memory
ordering or timing. ``build`` returns the shared library's path; ``Emulated`` wraps it with
the same arguments the cuda backend's wrappers pass.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from otq_kernels.backends.cuda import (
    DTYPE_CODES,
    GEMV_MAX_M,
    MMA_MAX_M,
    fragment_planes,
    tap_major_planes,
)
from otq_kernels.format import QuantizedTensor, padded_k, plane_widths
from otq_kernels.ops import conv2d_output_shape

ROOT = Path(__file__).resolve().parents[2]
EMULATION = ROOT / "tests" / "cuda_emulation"
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + [EMULATION / "entry.cpp"]
FLAGS = ["-std=c++20", "-O1", "-g", "-fPIC", "-pthread", "-fno-strict-aliasing", "-Wall",
         "-Wno-unknown-pragmas", "-Werror", f"-I{EMULATION / 'include'}", f"-I{ROOT / 'csrc'}"]
SANITIZERS = {"address": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"],
              "thread": ["-fsanitize=thread"]}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _fingerprint(sanitize: str | None) -> str:
    digest = hashlib.sha256(" ".join(FLAGS + SANITIZERS.get(sanitize, [])).encode())
    inputs = (SOURCES + list((EMULATION / "include").rglob("*.h*")) +
              list((ROOT / "csrc").glob("*.h")) + list((ROOT / "csrc" / "cuda").glob("*")))
    for path in sorted(set(inputs)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build(out_dir: Path, sanitize: str | None = None) -> Path:
    """Compile every source (in parallel) and link ``libotq_emu.so`` in out_dir/<hash>/."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no host C++ compiler (g++ or $CXX) to build the CUDA emulation")
    target = Path(out_dir) / _fingerprint(sanitize) / "libotq_emu.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = FLAGS + SANITIZERS.get(sanitize, [])
    objects = _compile(SOURCES, [*flags, "-x", "c++"], target.parent, "the CUDA emulation")
    subprocess.run([cxx, *flags, "-shared", "-o", str(target), *objects], check=True)
    return target


def _compile(sources: list[Path], flags: list[str], out_dir: Path, what: str) -> list[str]:
    """Compile ``sources`` in parallel into ``out_dir``/<name>.o; the object paths."""
    objects, jobs = [], []
    for src in sources:
        obj = out_dir / (src.name + ".o")
        objects.append(str(obj))
        jobs.append(subprocess.Popen([compiler(), *flags, "-c", str(src), "-o", str(obj)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for src, job in zip(sources, jobs, strict=True):
        log, _ = job.communicate()
        if job.returncode:
            raise RuntimeError(f"compiling {src.name} for {what} failed:\n{log}")
    return objects


def _ptrs(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class Emulated:
    """The CUDA launchers on CPU tensors. Every call raises RuntimeError on a non-zero code."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.otq_emu_error_string.restype = ctypes.c_char_p
        self.lib.otq_emu_fit_rows_workspace_bytes.restype = ctypes.c_size_t
        self.lib.otq_emu_fit_rows_workspace_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64,
                                                              ctypes.c_int]

    def _check(self, code: int) -> None:
        if code:
            raise RuntimeError(self.lib.otq_emu_error_string(code).decode())

    def linear(self, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
               split_k: int = 1, tensor_cores: bool = False,
               fragment: bool = False, block_rows: int = 16) -> torch.Tensor:
        """x [M, K] -> [M, N] in x.dtype, buffers sized exactly as the cuda backend's.

        tensor_cores: the mma kernel (lut_mma.cu) instead of the LUT GEMV (lut_gemv.cu);
        fragment: the same on the codes in fragment order (lut_frag.cu), built by the cuda
        backend's fragment_planes, in blocks of ``block_rows`` (16 or 32) weight rows.
        """
        if block_rows != 16 and not fragment:
            raise ValueError("block_rows other than 16 needs fragment=True, as cuda.linear")
        m, n, k = x.shape[0], qt.n, qt.k
        split_k = min(split_k, padded_k(k) // 32)
        x = x.contiguous()
        planes = fragment_planes(qt) if fragment else [p.contiguous() for p in qt.planes]
        book = qt.codebook.to(torch.float32).contiguous()
        per_channel = book.shape[0] == n and n > 1
        b = None if bias is None else bias.to(x.dtype).contiguous()  # as cuda.linear
        y = torch.full((m, n), float("nan"), dtype=x.dtype)
        rows = min(m, MMA_MAX_M if tensor_cores or fragment else GEMV_MAX_M)
        ws = torch.full((split_k * rows * n,), float("nan")) if split_k > 1 else None
        f = (self.lib.otq_emu_lut_linear_frag if fragment else
             self.lib.otq_emu_lut_linear_mma if tensor_cores else self.lib.otq_emu_lut_linear)
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_bool,
                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                      ctypes.c_void_p] + ([ctypes.c_int] if fragment else [])
        self._check(f(x.data_ptr(), DTYPE_CODES[x.dtype], m, k, _ptrs(planes), qt.bits,
                      book.data_ptr(), per_channel, n, None if b is None else b.data_ptr(),
                      y.data_ptr(), split_k, None if ws is None else ws.data_ptr(),
                      *([block_rows] if fragment else [])))
        return y

    def conv2d(self, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None,
               stride=(1, 1), padding=(0, 0), dilation=(1, 1), split_k: int = 1,
               nchw: bool = True) -> torch.Tensor:
        """x [B, C, H, W] (fp16/bf16) -> y [B, N, OH, OW] through lut_conv.cu, with the
        tap-major planes the cuda backend builds; y NCHW-contiguous (nchw) or channels-last."""
        n, c, kh, kw = qt.shape
        batch, _, h, w = x.shape
        _, _, oh, ow = conv2d_output_shape(x.shape, qt.shape, stride, padding, dilation)
        split_k = min(split_k, padded_k(kh * kw * c) // 32)
        planes = [p.contiguous() for p in tap_major_planes(qt)]
        xc = x.contiguous(memory_format=torch.channels_last)
        book = qt.codebook.to(torch.float32).contiguous()
        per_channel = book.shape[0] == n and n > 1
        b = None if bias is None else bias.to(x.dtype).contiguous()
        y = torch.full((batch, n, oh, ow), float("nan"), dtype=x.dtype)
        y = y if nchw else y.contiguous(memory_format=torch.channels_last)
        ws = (torch.full((split_k * batch * oh * ow * n,), float("nan"))
              if split_k > 1 else None)
        sizes = (ctypes.c_int64 * 5)(batch, c, h, w, n)
        params = (ctypes.c_int * 8)(kh, kw, *stride, *padding, *dilation)
        f = self.lib.otq_emu_lut_conv2d
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_bool,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_bool, ctypes.c_int,
                      ctypes.c_void_p]
        self._check(f(xc.data_ptr(), DTYPE_CODES[x.dtype], sizes, params, _ptrs(planes),
                      qt.bits, book.data_ptr(), per_channel,
                      None if b is None else b.data_ptr(), y.data_ptr(), nchw, split_k,
                      None if ws is None else ws.data_ptr()))
        return y

    def pack(self, codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
        """codes int64 [N, K] -> planes int32 [N, K_pad * w / 32] (filled with -1 first)."""
        n, k = codes.shape
        planes = [torch.full((n, padded_k(k) * w // 32), -1, dtype=torch.int32)
                  for w in plane_widths(bits)]
        f = self.lib.otq_emu_pack
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                      ctypes.c_void_p]
        self._check(f(codes.contiguous().data_ptr(), n, k, bits, _ptrs(planes)))
        return planes

    def unpack(self, planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
        n = planes[0].shape[0]
        codes = torch.full((n, k), -1, dtype=torch.int64)
        f = self.lib.otq_emu_unpack
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                      ctypes.c_void_p]
        self._check(f(_ptrs([p.contiguous() for p in planes]), n, k, bits, codes.data_ptr()))
        return codes

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight [N, K] in ``dtype`` through dequant.cu (out: where to write it,
        NaN-filled by default; a test may pass a misaligned view)."""
        if out is None:
            out = torch.full((qt.n, qt.k), float("nan"), dtype=dtype)
        book = qt.codebook.to(torch.float32).contiguous()
        f = self.lib.otq_emu_dequantize
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_bool,
                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        self._check(f(_ptrs([p.contiguous() for p in qt.planes]), qt.bits, book.data_ptr(),
                      book.shape[0] == qt.n and qt.n > 1, qt.n, qt.k, DTYPE_CODES[dtype],
                      out.data_ptr()))
        return out

    def fit_rows(self, rows: torch.Tensor, bits: int, nearest: bool = False,
                 workspace_bytes: int | None = None):
        """rows float32 [R, n] -> (codes int64 [R, n], centroids float32 [R, 2**bits]).

        workspace_bytes: None = what the launcher asks for (a test may pass less).
        """
        x = rows.to(torch.float32).contiguous()
        r, n = x.shape
        nbytes = workspace_bytes
        if nbytes is None:
            nbytes = self.lib.otq_emu_fit_rows_workspace_bytes(r, n, bits)
        ws = torch.full((nbytes,), 0x5A, dtype=torch.uint8)
        codes = torch.full((r, n), -1, dtype=torch.int64)
        centroids = torch.full((r, 2**bits), float("nan"))
        f = self.lib.otq_emu_fit_rows
        f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                      ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_size_t]
        self._check(f(x.data_ptr(), r, n, bits, nearest, codes.data_ptr(), centroids.data_ptr(),
                      ws.data_ptr(), nbytes))
        return codes, centroids


def run_sample(emu: Emulated) -> None:
    """Every launcher once or twice against the reference (for the sanitizer runs)."""
    import otq_kernels as otq
    from otq_kernels.backends import reference
    from otq_kernels.format import pack_codes
    from otq_kernels.quantizers import ot_rows

    gen = torch.Generator().manual_seed(0)
    for bits, granularity, split_k in ((3, "channel", 3), (4, "tensor", 1), (8, "channel", 2)):
        w = torch.randn(20, 300, generator=gen)
        qt = otq.fit_codebook(w, bits=bits, granularity=granularity, backend="reference")
        x = torch.randn(9, 300, generator=gen).half()
        bias = torch.randn(20, generator=gen).half()
        want = reference.linear(x.float(), qt, bias.float())
        for tensor_cores in (False, bits <= 4):
            y = emu.linear(x, qt, bias, split_k, tensor_cores=tensor_cores)
            torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    # the tensor-core kernel's chunk loop: 34 whole groups (K % 8 == 0: 16-byte x loads,
    # words and x loaded ahead) and a partial one, per channel; 9 x rows run spans of 2
    # groups (x 2 spans ahead), one row spans of 4 (16-byte code loads), each with whole
    # groups left over after the spans
    qt = otq.fit_codebook(torch.randn(20, 1104, generator=gen), bits=4,
                          granularity="channel", backend="reference")
    x = torch.randn(9, 1104, generator=gen).half()
    for rows in (x, x[:1]):
        y = emu.linear(rows, qt, None, 1, tensor_cores=True)
        torch.testing.assert_close(y.float(), reference.linear(rows.float(), qt, None),
                                   rtol=1e-2, atol=1e-2)
    # the same on fragment-order codes (lut_frag.cu): 8 whole spans and a partial one, x
    # masked past K, words 2 spans ahead; split 2 on span boundaries
    for rows, split_k in ((x, 2), (x[:1], 1)):
        y = emu.linear(rows, qt, None, split_k, fragment=True)
        torch.testing.assert_close(y.float(), reference.linear(rows.float(), qt, None),
                                   rtol=1e-2, atol=1e-2)
    # 2-bit codes there look up in registers: per channel, rows 16..19 of a 32-row block
    # read their codebooks, 20..31 clamp to the last row
    qt2 = otq.fit_codebook(torch.randn(20, 1104, generator=gen), bits=2,
                           granularity="channel", backend="reference")
    y = emu.linear(x, qt2, None, 1, fragment=True)
    torch.testing.assert_close(y.float(), reference.linear(x.float(), qt2, None),
                               rtol=1e-2, atol=1e-2)
    # and 8-bit codes of one codebook per layer through its table of single entries
    qt8 = otq.fit_codebook(torch.randn(20, 1104, generator=gen), bits=8, granularity="tensor",
                           backend="reference")
    y = emu.linear(x, qt8, None, 2, fragment=True)
    torch.testing.assert_close(y.float(), reference.linear(x.float(), qt8, None),
                               rtol=1e-2, atol=1e-2)
    # 32-row blocks: 3-bit per-channel tables of both row blocks in shared memory (the
    # second block's second row block lies past the layout's 3) and 8-bit codes loaded one
    # span ahead, split 2
    for bits, granularity, split_k in ((3, "channel", 1), (8, "tensor", 2)):
        qt = otq.fit_codebook(torch.randn(40, 1104, generator=gen), bits=bits,
                              granularity=granularity, backend="reference")
        y = emu.linear(x, qt, None, split_k, fragment=True, block_rows=32)
        torch.testing.assert_close(y.float(), reference.linear(x.float(), qt, None),
                                   rtol=1e-2, atol=1e-2)
    # one activation row over 35 groups: the GEMV's load-ahead crosses steps
    qt = otq.fit_codebook(torch.randn(20, 1100, generator=gen), bits=4, backend="reference")
    x = torch.randn(1, 1100, generator=gen).half()
    y = emu.linear(x, qt, None, 1)
    torch.testing.assert_close(y.float(), reference.linear(x.float(), qt, None),
                               rtol=1e-2, atol=1e-2)
    # the conv kernel: 3x3 with padding (pixels outside the image), split-K, 60 pixels of
    # a 64-pixel tile, NCHW and channels-last output
    qt = otq.fit_codebook(torch.randn(20, 16, 3, 3, generator=gen), bits=4,
                          granularity="channel", backend="reference")
    x = torch.randn(2, 16, 5, 6, generator=gen).half()
    want = reference.conv2d(x.float(), qt, None, (1, 1), (1, 1), (1, 1), 1)
    for split_k, nchw in ((1, True), (2, False)):
        y = emu.conv2d(x, qt, None, (1, 1), (1, 1), (1, 1), split_k, nchw)
        torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2)
    codes = torch.randint(0, 32, (3, 33), generator=gen)
    planes = emu.pack(codes, 5)
    assert all(torch.equal(a, b) for a, b in zip(planes, pack_codes(codes, 5), strict=True))
    assert torch.equal(emu.unpack(planes, 5, 33), codes)
    # the dense expansion: 16-byte stores of whole octets (K = 72), element-wise ones of a
    # partial last octet (K = 33) at two words per plane (8 bits)
    for bits, shape in ((3, (4, 72)), (8, (3, 33))):
        qt = otq.fit_codebook(torch.randn(*shape, generator=gen), bits=bits,
                              granularity="channel", backend="reference")
        assert torch.equal(emu.dequantize(qt, torch.float16), qt.dequantize(torch.float16))
    for rows, assign in ((3, "rank"), (1, "nearest")):
        x = torch.randn(rows, 50, generator=gen)
        got, _ = emu.fit_rows(x, 3, nearest=assign == "nearest")
        assert torch.equal(got, ot_rows(x.double(), 3, assign)[0])


if __name__ == "__main__":
    import sys

    sanitizer, out_dir = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)  # TSan cannot see torch's OpenMP barriers: it reports races there
    run_sample(Emulated(build(out_dir, sanitize=sanitizer)))
    print("sample ok")


BINDING_SOURCES = [ROOT / "csrc" / "bindings.cpp"] + sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
BINDING_MODULE = "_C_emu"


def build_bindings(out_dir: Path) -> Path:
    """The extension's CUDA variant on the emulated launchers: ``csrc/bindings.cpp`` with
    ``OTQ_WITH_CUDA`` and the CPU sources (host code at -O1), linked against
    :func:`build`'s library, as a Python module ``_C_emu`` with the real ``cuda_*``
    bindings. Returns its path (cached by source hash next to the library)."""
    import sysconfig

    import pybind11

    lib = build(out_dir)
    digest = hashlib.sha256(lib.parent.name.encode())
    for path in BINDING_SOURCES + sorted((ROOT / "csrc").rglob("*.h")):
        digest.update(path.read_bytes())
    target = lib.parent / f"bindings_{digest.hexdigest()[:12]}" / f"{BINDING_MODULE}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-O1", "-fPIC", "-fopenmp", "-DOTQ_WITH_CUDA=1",
             f"-DTORCH_EXTENSION_NAME={BINDING_MODULE}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}"]
    objects = _compile(BINDING_SOURCES, flags, target.parent, "the emulated bindings")
    partial = target.with_suffix(".partial")
    subprocess.run([compiler(), "-shared", "-fopenmp", "-o", str(partial), *objects,
                    f"-L{lib.parent}", "-l" + lib.stem.removeprefix("lib"),
                    f"-Wl,-rpath,{lib.parent.resolve()}"], check=True)
    os.replace(partial, target)  # a module that exists is whole
    return target


def load_bindings(path: Path):
    """Import the module :func:`build_bindings` wrote."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(BINDING_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
