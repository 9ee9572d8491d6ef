"""``ms_deform_attn``: the native op with its fake kernel and autograd, and the dispatch to the PyTorch path."""

from __future__ import annotations

import warnings

import torch

from . import _extension
from .reference import SpatialShapes, ms_deform_attn_pytorch
from .validation import check_shapes

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def use_native(value: torch.Tensor) -> bool:
    """True when the compiled op should run for a tensor on ``value``'s device (warns once when it cannot)."""
    if _extension.forced_pytorch():
        return False
    if not _extension.extension_loaded():
        served = value.device.type in ("cpu", "cuda", "meta")  # what a build adds kernels for (meta: fake ones)
        fix = f" To get the fast kernels, {_extension.BUILD_HINT}." if served else ""
        _warn_once(
            "missing",
            f"deformable: the native extension is not available ({_extension.LOAD_ERROR}); using the slower "
            f"PyTorch path.{fix}",
        )
        return False
    if value.device.type == "meta":  # shapes only: the fake kernels answer (the PyTorch path reads spatial_shapes)
        return True
    if value.device.type not in _extension.NATIVE_DEVICES:
        device = value.device.type
        if device in ("cpu", "cuda"):
            why = f"the native extension was built without {device} kernels (built for: {_extension.build_info()})"
            fix = f" To get them, {_extension.BUILD_HINT}."
        else:  # mps, xpu, ...: no build adds them
            why, fix = f"the native extension has kernels for the CPU and CUDA only, not {device}", ""
        _warn_once(f"device-{device}", f"deformable: {why}; using the PyTorch path on {device}.{fix}")
        return False
    return True


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (bilinear sampling, zero padding, ``align_corners=False``).

    Args:
        value: ``(N, S, M, D)`` float64/float32/float16/bfloat16, ``S = sum_l H_l * W_l``.
        spatial_shapes: ``(L, 2)`` int64, rows ``(H_l, W_l)``, on value's device.
        level_start_index: ``(L,)`` int64, start of each level in ``S``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` in [0, 1]; outside reads zeros.
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)`` in value's dtype. Uses the compiled kernel when the extension is loaded and has a
        kernel for value's device, else :func:`ms_deform_attn_pytorch`. Locations and weights are computed in
        float32 (float64 for float64 value) whatever value's dtype, so under autocast the op runs in the dtype
        the value projection produced.
    """
    check_shapes(value, sampling_locations, attention_weights, spatial_shapes, level_start_index)
    if not use_native(value):
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    coord = torch.float64 if value.dtype == torch.float64 else torch.float32
    return torch.ops.deformable.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations.to(coord), attention_weights.to(coord)
    )


def _check_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    # A meta tensor among real ones also routes the call to the fake kernel: the same checks as the kernels.
    check_shapes(value, sampling_locations, attention_weights, spatial_shapes, level_start_index)


def _output_like(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> torch.Tensor:
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


if _extension.extension_loaded():
    # value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    _extension.register_native_op("ms_deform_attn", _check_fake, _output_like, (True, False, False, True, True))

__all__ = ["SpatialShapes", "ms_deform_attn", "ms_deform_attn_pytorch"]
