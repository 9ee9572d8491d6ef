"""``backend(name)``: which path ``ms_deform_attn`` takes inside a ``with`` block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

BACKENDS = ("native", "pytorch")
ENV_VAR = "DEFORMABLE_BACKEND"  # read by _extension.forced_pytorch() on every call of the op


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Selects the multi-scale deformable attention path for the block, e.g. for ONNX export::

        with deformable.backend("pytorch"):
            torch.onnx.export(model, (images,), dynamo=True)

    Args:
        name: ``"pytorch"``: the pure-PyTorch ``grid_sample`` path (exports to ONNX GridSample); ``"native"``: the
            compiled op where it is built for the device, else the PyTorch path (the default).

    It sets the ``DEFORMABLE_BACKEND`` environment variable, which the op reads on every call, and restores it on
    exit: the choice is process-wide, so threads running other models at the same time see it too.
    """
    if name not in BACKENDS:
        raise ValueError(f"deformable.backend: name must be one of {', '.join(BACKENDS)}, got {name!r}")
    previous = os.environ.get(ENV_VAR)
    if name == "pytorch":
        os.environ[ENV_VAR] = "pytorch"
    else:
        os.environ.pop(ENV_VAR, None)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
