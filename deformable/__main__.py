"""``python -m deformable``: prints what is installed and whether the native op loaded, and why not."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _extension

CPU_ISAS = ("base", "avx2", "avx512")  # what csrc/cpu/isa_dispatch.cpp accepts in DEFORMABLE_CPU_ISA


def diagnose() -> str:
    lines = [
        f"deformable {__version__}",
        f"python     {platform.python_version()} ({sys.executable})",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
        f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}",
        f"CPU threads: {torch.get_num_threads()}, CPU vector ISA (torch): {torch.backends.cpu.get_cpu_capability()}",
    ]
    if _extension.extension_loaded():
        lines.append(f"native op: loaded, built for: {_extension.build_info()}")
        for device in ("cpu", "cuda"):
            lines.append(f"  {device} kernel: {'yes' if _extension.native_supports(device) else 'no'}")
    else:
        lines.append(f"native op: NOT loaded: {_extension.LOAD_ERROR}")
        lines.append(f"  to fix: {_extension.BUILD_HINT}")
    isa = os.environ.get("DEFORMABLE_CPU_ISA")
    if isa and isa not in CPU_ISAS:  # the kernels refuse it on every call (case matters)
        allowed = ", ".join(CPU_ISAS)
        lines.append(f"DEFORMABLE_CPU_ISA={isa}: INVALID, every CPU op call will fail: use one of {allowed}")
    elif isa:
        lines.append(f"DEFORMABLE_CPU_ISA={isa}: caps the deformable CPU kernels' instruction set at {isa}")
    if _extension.forced_pytorch():
        lines.append("DEFORMABLE_BACKEND=pytorch: the PyTorch path is forced")
    lines.append(f"backend in use: {'native' if _extension.native_available() else 'pytorch'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(diagnose())
