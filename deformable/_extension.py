"""Loads the compiled ``deformable._C`` library and says why when it cannot."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence

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


def register_native_op(
    name: str,
    check: Callable[..., None],
    output_like: Callable[..., torch.Tensor],
    differentiable: Sequence[bool],
) -> None:
    """Fake kernels and autograd for the native op ``deformable::<name>`` and its ``<name>_backward``.

    Args:
        check: ``check(*inputs)`` raises on inputs the kernels refuse: the fake kernels run it too, so a traced call
            with bad shapes fails instead of returning garbage.
        output_like: ``output_like(*inputs)`` -> an empty tensor shaped like the forward's output.
        differentiable: one flag per input; the backward op returns one gradient per flagged input, in order, each
            shaped like that input (the kernels return fresh contiguous tensors whatever the input strides); a
            ``Tensor[]`` input gets a list of gradients.
    """
    qualified = f"deformable::{name}"
    backward_op = getattr(torch.ops.deformable, f"{name}_backward")
    flagged = [i for i, flag in enumerate(differentiable) if flag]

    def empty_like(x):
        return [t.new_empty(t.shape) for t in x] if isinstance(x, (list, tuple)) else x.new_empty(x.shape)

    def forward_fake(*inputs):
        check(*inputs)
        return output_like(*inputs)

    def backward_fake(grad_output, *inputs):
        check(*inputs)
        return tuple(empty_like(inputs[i]) for i in flagged)

    def setup_context(ctx, inputs, output):
        # save_for_backward takes tensors only: a Tensor[] input is saved flat and its length remembered
        ctx.lengths = [len(x) if isinstance(x, (list, tuple)) else None for x in inputs]
        ctx.save_for_backward(*(t for x in inputs for t in (x if isinstance(x, (list, tuple)) else (x,))))

    def backward(ctx, grad_output):
        saved, inputs = iter(ctx.saved_tensors), []
        for length in ctx.lengths:
            inputs.append(next(saved) if length is None else [next(saved) for _ in range(length)])
        grads = iter(backward_op(grad_output, *inputs))
        return tuple(next(grads) if flag else None for flag in differentiable)

    def no_second_derivative(ctx, *grads):
        raise RuntimeError(
            f"{qualified}: the native kernels have no second derivative (a gradient of a gradient, e.g. a gradient "
            "penalty); run such a computation on the PyTorch path: with deformable.backend('pytorch'): ... or "
            "DEFORMABLE_BACKEND=pytorch"
        )

    torch.library.register_fake(qualified)(forward_fake)
    torch.library.register_fake(f"{qualified}_backward")(backward_fake)
    torch.library.register_autograd(qualified, backward, setup_context=setup_context)
    # Without it autograd would treat the backward op as constant and a double backward would silently give zeros.
    torch.library.register_autograd(
        f"{qualified}_backward", no_second_derivative, setup_context=lambda ctx, inputs, output: None
    )
