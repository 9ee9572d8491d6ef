"""Builds ``deformable._C``: the multi-scale deformable attention kernels (CPU always, CUDA when possible).

Environment:
    FORCE_CUDA=1            compile the CUDA sources even if torch has no CUDA runtime here (needs nvcc).
    FORCE_CPU=1             never compile the CUDA sources.
    DEFORMABLE_NO_EXT=1     build no extension at all: the package then runs on its pure-PyTorch path (slower), for a
                            machine without a working C++ compiler.
    TORCH_CUDA_ARCH_LIST    architectures to build for, e.g. "8.0;9.0" (default: DEFAULT_CUDA_ARCHS below, less
                            those the toolkit's nvcc cannot compile for).
    CUDA_HOME               the CUDA toolkit; found from torch or an nvcc wrapper when unset.
    MAX_JOBS                parallel compile jobs for ninja.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# sm_80 code also runs on 8.6/8.9 GPUs; +PTX lets GPUs newer than the list JIT the kernels.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0;10.0;12.0+PTX"
NEWEST_ARCH_NEEDS = {"10.0": (12, 8), "12.0": (12, 8), "9.0": (11, 8)}  # the first nvcc release that compiles for it


def _nvcc_release(home: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the toolkit's nvcc (``release 12.4`` in ``nvcc --version``); None when unreadable."""
    try:
        text = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def default_cuda_archs(release: tuple[int, int] | None) -> str:
    """:data:`DEFAULT_CUDA_ARCHS` less the architectures nvcc ``release`` cannot compile for (a 12.4 toolkit, which
    the cu124 torch wheels pair with, knows no 10.0 or 12.0), ``+PTX`` kept on the newest one left."""
    archs = [arch.removesuffix("+PTX") for arch in DEFAULT_CUDA_ARCHS.split(";")]
    if release is not None:
        archs = [arch for arch in archs if release >= NEWEST_ARCH_NEEDS.get(arch, (0, 0))]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


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
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:  # nvcc is asked its release only when the default is used
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_archs(_nvcc_release(home))
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
    ext_modules=[] if os.environ.get("DEFORMABLE_NO_EXT", "0") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
