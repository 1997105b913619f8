"""Build the native extension ``otq_kernels._C``.

The C++ CPU sources are always built. The CUDA sources are added when torch was built
with CUDA and nvcc is found (or ``OTQ_FORCE_CUDA=1``). Environment flags:

- ``OTQ_SKIP_CUDA_BUILD=1``  never build the CUDA sources.
- ``OTQ_FORCE_CUDA=1``       build them even when no GPU is visible (cross-compiling).
- ``OTQ_CUDA_ARCHS``         semicolon-separated SM list, default ``80;90``.
- ``MAX_JOBS``               parallel compile jobs (ninja), read by torch's build_ext.
- ``OTQ_NVCC_THREADS``       nvcc ``--split-compile`` threads per CUDA source (default 0:
  one per CPU): the optimizer runs per kernel in parallel, so the file with the most
  template instantiations (``lut_gemv.cu``) no longer sets the build time alone.
- ``OTQ_SKIP_NATIVE_BUILD=1`` build no extension at all (pure-Python install).
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_wanted() -> bool:
    if _flag("OTQ_SKIP_CUDA_BUILD"):
        return False
    if _flag("OTQ_FORCE_CUDA"):
        return True
    import torch

    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    return torch.version.cuda is not None and bool(has_nvcc)


def _arch_flags() -> list[str]:
    archs = os.environ.get("OTQ_CUDA_ARCHS", "80;90")
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if _flag("OTQ_SKIP_NATIVE_BUILD"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/bindings.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
