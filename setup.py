"""Build the native extension ``otq_kernels._C``.

The C++ CPU sources are always built. The CUDA sources are added when torch was built
with CUDA and nvcc is found (or ``OTQ_FORCE_CUDA=1``). Environment flags:

- ``OTQ_SKIP_CUDA_BUILD=1``  never build the CUDA sources.
- ``OTQ_FORCE_CUDA=1``       build them even when no GPU is visible (cross-compiling).
- ``OTQ_CUDA_ARCHS``         semicolon-separated SM list (sm_80 or newer), default ``80;90``.
- ``MAX_JOBS``               parallel compile jobs (ninja), read by torch's build_ext.
- ``OTQ_NVCC_THREADS``       nvcc ``--split-compile`` threads per CUDA source (default 0:
  one per CPU): the optimizer runs per kernel in parallel, so the file with the most
  template instantiations (``lut_gemv.cu``) no longer sets the build time alone.
- ``OTQ_SKIP_NATIVE_BUILD=1`` build no extension at all (pure-Python install).
"""

import glob
import os
import re
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_ARCH = 80  # the CUDA kernels' mma.sync.m16n8k16 (fp16 and bf16) needs sm_80


def _flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        raise SystemExit(f"setup.py: {name}={os.environ[name]!r}: use 1 or 0")
    return value in ("1", "true", "yes", "on")


def _cuda_wanted() -> bool:
    if _flag("OTQ_SKIP_CUDA_BUILD"):
        return False
    import torch

    if _flag("OTQ_FORCE_CUDA"):
        if torch.version.cuda is None:  # (torch's CUDAExtension then finds no CUDA_HOME)
            raise SystemExit(f"setup.py: OTQ_FORCE_CUDA=1 needs a CUDA build of torch; "
                             f"this one ({torch.__version__}) is CPU-only")
        return True
    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    return torch.version.cuda is not None and bool(has_nvcc)


def cuda_archs(value: str) -> list[str]:
    """OTQ_CUDA_ARCHS (``80;90``; ``8.0``, ``sm_90``, ``90a`` and ``100f`` forms, ``;``,
    ``,`` or spaces between) as nvcc's SM numbers, or SystemExit saying what is wrong."""
    archs = []
    for item in filter(None, re.split(r"[;,\s]+", value)):
        match = re.fullmatch(r"(?:sm_)?([1-9]\d?)\.?(\d)([af]?)", item)
        if not match or int(match[1] + match[2]) < MIN_ARCH:
            raise SystemExit(f"setup.py: OTQ_CUDA_ARCHS={value!r}: {item!r} is not an SM "
                             f"number of {MIN_ARCH} or more (e.g. '80;90': the kernels' "
                             f"mma.sync.m16n8k16 needs sm_{MIN_ARCH})")
        archs.append("".join(match.groups()))
    if not archs:
        raise SystemExit(f"setup.py: OTQ_CUDA_ARCHS={value!r} names no SM number (e.g. '80;90')")
    return archs


def _arch_flags() -> list[str]:
    flags = []
    for arch in cuda_archs(os.environ.get("OTQ_CUDA_ARCHS", "80;90")):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if _flag("OTQ_SKIP_NATIVE_BUILD"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/bindings.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-g0"]  # (-g0: Python's -g made it 20x larger)
    if _cuda_wanted():
        sources += _sources("csrc/cuda/*.cu")
        threads = os.environ.get("OTQ_NVCC_THREADS", "0")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                f"--split-compile={threads}"] + _arch_flags()
        ext = CUDAExtension(
            "otq_kernels._C",
            sources,
            define_macros=[("OTQ_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "otq_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # (setuptools runs it so; tests import its helpers)
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
