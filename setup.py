"""Builds ``deformable._C``: the multi-scale deformable attention kernels (CPU always, CUDA when possible).

Environment:
    FORCE_CUDA=1            compile the CUDA sources even if torch has no CUDA runtime here (needs nvcc).
    FORCE_CPU=1             never compile the CUDA sources.
    TORCH_CUDA_ARCH_LIST    architectures to build for, e.g. "8.0;9.0" (default: DEFAULT_CUDA_ARCHS below).
    CUDA_HOME               the CUDA toolkit; found from torch or an nvcc wrapper when unset.
    MAX_JOBS                parallel compile jobs for ninja.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# sm_80 code also runs on 8.6/8.9 GPUs; +PTX lets GPUs newer than the list JIT the kernels.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0;10.0;12.0+PTX"


def _toolkit_ok(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _cuda_home() -> str | None:
    """The CUDA toolkit: CUDA_HOME, else torch's guess, else where an ``nvcc`` wrapper really points."""
    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if _toolkit_ok(home):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
        for line in (dryrun.stdout + dryrun.stderr).splitlines():
            if line.startswith("#$ TOP="):
                home = os.path.realpath(line.split("=", 1)[1].strip())
                if _toolkit_ok(home):
                    return home
    return None


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    home = _cuda_home()
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to it")
        return True
    return home is not None and torch.version.cuda is not None


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
        home = _cuda_home()
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home  # BuildExtension reads the module attribute
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cuda_sources = sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
        sources += [os.path.relpath(s, root) for s in cuda_sources]
        define_macros.append(("WITH_CUDA", None))
        define_macros.append(("DEFORMABLE_CUDA_ARCHS", f'"{os.environ["TORCH_CUDA_ARCH_LIST"]}"'))
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--threads", "0"]  # archs in parallel
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
