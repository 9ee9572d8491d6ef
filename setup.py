"""Builds ``deformable._C``: the multi-scale deformable attention kernels (CPU always, CUDA when possible).

Environment:
    FORCE_CUDA=1            compile the CUDA sources even if torch has no CUDA runtime here (needs nvcc).
    FORCE_CPU=1             never compile the CUDA sources.
    TORCH_CUDA_ARCH_LIST    architectures to build for, e.g. "8.0;9.0" (default: DEFAULT_CUDA_ARCHS below).
    MAX_JOBS                parallel compile jobs for ninja.
"""

from __future__ import annotations

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# CUDA 13 supports compute capability 7.5 and newer; +PTX lets newer GPUs JIT the code.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    root = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp")))
    sources = [os.path.relpath(s, root) for s in sources]
    # -fno-trapping-math lets GCC vectorise the branch-free corner computation of the CPU kernel.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fdiagnostics-color=always"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is header code that parallelises only when compiled with OpenMP; the libgomp
        # loaded with torch (same soname) serves it, so there is still one thread pool.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cuda_sources = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
        sources += [os.path.relpath(s, root) for s in cuda_sources]
        define_macros.append(("WITH_CUDA", None))
        define_macros.append(("DEFORMABLE_CUDA_ARCHS", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"'))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "deformable._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    return CppExtension(
        "deformable._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
