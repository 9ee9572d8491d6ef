"""setup.py's choices (no extension on request, CUDA architectures the toolkit can compile for) and the C++ sources
compiling with the compilers users have: GCC before 12 (Ubuntu 22.04's 11) and Clang (macOS) lack builtins that
GCC 12 has, and the kernels pick what each one offers."""

from __future__ import annotations

import glob
import os
import runpy
import shutil
import subprocess
import sysconfig

import pytest
import setuptools
from _repo import ROOT


@pytest.fixture(scope="module")
def setup_script():
    """setup.py's names, run with ``setuptools.setup`` recorded instead of building; ``DEFORMABLE_NO_EXT=1``."""
    calls: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setuptools, "setup", lambda **kwargs: calls.append(kwargs))
        patch.setenv("DEFORMABLE_NO_EXT", "1")
        names = runpy.run_path(os.path.join(ROOT, "setup.py"))
    return names, calls


def test_no_extension_when_asked(setup_script) -> None:
    _, calls = setup_script
    assert len(calls) == 1 and calls[0]["ext_modules"] == []


def test_default_cuda_archs_are_those_the_toolkit_compiles_for(setup_script) -> None:
    default_cuda_archs = setup_script[0]["default_cuda_archs"]
    assert default_cuda_archs((12, 8)) == "7.5;8.0;9.0;10.0;12.0+PTX"
    assert default_cuda_archs((13, 0)) == "7.5;8.0;9.0;10.0;12.0+PTX"
    assert default_cuda_archs((12, 4)) == "7.5;8.0;9.0+PTX"  # the cu124 wheels' toolkit: no Blackwell yet
    assert default_cuda_archs((11, 7)) == "7.5;8.0+PTX"
    assert default_cuda_archs(None) == setup_script[0]["DEFAULT_CUDA_ARCHS"]  # nvcc unreadable: the list as it is


OTHER_COMPILERS = [c for c in ("g++-11", "g++-10", "clang++", "clang++-14", "clang++-15") if shutil.which(c)]


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_COMPILERS, reason="no GCC before 12 or Clang on this machine")
@pytest.mark.parametrize("compiler", OTHER_COMPILERS)
def test_the_cpu_sources_compile_with_other_compilers(compiler: str) -> None:
    import torch.utils.cpp_extension as cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    sources = sorted(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    failed = {}
    for source in sources:
        run = subprocess.run(
            [compiler, "-std=c++20", "-fsyntax-only", "-fno-trapping-math", *includes, source],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            failed[os.path.relpath(source, ROOT)] = [line for line in run.stderr.splitlines() if "error" in line][:3]
    assert not failed, failed
