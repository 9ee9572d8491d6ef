"""The op's argument checks on the Python side: ``check_shapes`` (both paths, the fake kernels; metadata only, so
free under torch.compile) and ``check_levels`` (the PyTorch path, which reads the level sizes anyway).

The native kernels check the same in C++ (``csrc/ms_deform_attn.cpp``), as a guard for direct ``torch.ops.deformable``
calls, which skip these; the C++ side also validates ``level_start_index`` against the level sizes.
"""

from __future__ import annotations

import math
import numbers

import torch


def check_shapes(
    value: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    spatial_shapes: object = None,
    level_start_index: object = None,
) -> None:
    """Raises ValueError/TypeError naming the problem when the op's tensors disagree in rank, size or device."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must have shape (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6:
        raise ValueError(
            "ms_deform_attn: sampling_locations must have shape (N, Lq, M, L, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            "ms_deform_attn: attention_weights must have shape (N, Lq, M, L, P), "
            f"got shape {tuple(attention_weights.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(f"ms_deform_attn: value must be a floating-point tensor, got {value.dtype}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"ms_deform_attn: {name} must be a floating-point tensor, got {t.dtype}")
    n, _, m, _ = value.shape
    if sampling_locations.shape[0] != n:
        raise ValueError(
            f"ms_deform_attn: sampling_locations batch size {sampling_locations.shape[0]} "
            f"does not match value batch size {n}"
        )
    if sampling_locations.shape[2] != m:
        raise ValueError(
            f"ms_deform_attn: sampling_locations has {sampling_locations.shape[2]} heads but value has {m}"
        )
    if sampling_locations.shape[5] != 2:
        raise ValueError(
            "ms_deform_attn: the last dimension of sampling_locations must be 2 (x, y), "
            f"got {sampling_locations.shape[5]}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights has shape {tuple(attention_weights.shape)} but sampling_locations "
            f"{tuple(sampling_locations.shape)} requires (N, Lq, M, L, P) = {tuple(sampling_locations.shape[:5])}"
        )
    if isinstance(spatial_shapes, torch.Tensor) and (spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must have shape (L, 2), (H, W) per level, got shape "
            f"{tuple(spatial_shapes.shape)}"
        )
    named = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if isinstance(t, torch.Tensor):
            named[name] = t
    if len({t.device for t in named.values()}) > 1:
        where = ", ".join(f"{name} {t.device}" for name, t in named.items())
        raise ValueError(f"ms_deform_attn: inputs are on different devices ({where})")


def check_levels(shapes: list[tuple[int, int]], spatial: int, levels: int) -> None:
    """Raises ValueError unless ``shapes`` (``(H_l, W_l)`` per level, ints or SymInts) describes ``levels`` levels of
    non-negative size that sum to ``spatial`` positions. Symbolic sizes are not checked by value (a check would fix
    the traced graph to one image size)."""
    if not levels:
        raise ValueError("ms_deform_attn: sampling_locations has no level (L = 0): give at least one feature map")
    if len(shapes) != levels:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes describes {len(shapes)} levels, sampling_locations has {levels}"
        )
    if any(isinstance(size, torch.SymInt) for hw in shapes for size in hw):
        return
    if any(h < 0 or w < 0 for h, w in shapes):
        raise ValueError(f"ms_deform_attn: spatial_shapes {shapes} has a negative size")
    if not isinstance(spatial, torch.SymInt) and sum(h * w for h, w in shapes) != spatial:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes sum to {sum(h * w for h, w in shapes)} positions (sum of H*W) "
            f"but value has S = {spatial} positions"
        )


def check_size(owner: str, name: str, value: object) -> None:
    """Raises ValueError unless ``value`` (the constructor argument ``name`` of ``owner``) is an integer >= 1."""
    # bool is an int to Python, but MSDeformAttn(..., n_points=True) is a mistake, not one point.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}: {name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be >= 1, got {value}")


def check_real(owner: str, name: str, value: object, positive: bool = False) -> None:
    """Raises ValueError unless ``value`` (the argument ``name`` of ``owner``) is a finite real number (> 0 when
    ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r} ({type(value).__name__})")
    if positive and value <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value}")
