"""Loads the compiled ``deformable._C`` library and says why when it cannot."""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository (needs a C++ compiler and ninja; "
    "nvcc and CUDA_HOME for the CUDA kernels); run `python -m deformable` for a diagnosis"
)


def _load() -> str | None:
    """Imports ``deformable._C``; returns None on success, else why it failed."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return "deformable._C is not built (no compiled library next to the package)"
    try:
        importlib.import_module(f"{__package__}._C")  # registers torch.ops.deformable.*
    except (ImportError, OSError) as exc:  # a stale or ABI-mismatched build, a missing CUDA runtime
        return f"{type(exc).__name__}: {exc}"
    return None


LOAD_ERROR: str | None = _load()


def forced_pytorch() -> bool:
    """True when the environment variable ``DEFORMABLE_BACKEND=pytorch`` forces the PyTorch path."""
    return os.environ.get("DEFORMABLE_BACKEND", "").strip().lower() == "pytorch"


def extension_loaded() -> bool:
    """True when ``deformable._C`` was imported, whatever ``DEFORMABLE_BACKEND`` says."""
    return LOAD_ERROR is None


def native_available() -> bool:
    """True when the native op is loaded and not disabled by ``DEFORMABLE_BACKEND=pytorch``."""
    return extension_loaded() and not forced_pytorch()


def native_supports(device_type: str) -> bool:
    """True when the loaded extension has a kernel for ``device_type`` ("cpu", "cuda")."""
    if not extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("deformable::ms_deform_attn", key)


def build_info() -> str:
    """What the extension was built for, e.g. ``"cpu;cuda archs=8.0;9.0"``, or "" when not loaded."""
    return torch.ops.deformable.build_info() if extension_loaded() else ""


# Looked up once: a dispatcher query inside the op's Python wrapper would break torch.compile(fullgraph=True).
NATIVE_DEVICES: frozenset[str] = frozenset(d for d in ("cpu", "cuda") if native_supports(d))
