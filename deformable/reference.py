"""Pure-PyTorch multi-scale deformable attention: the fallback path and the test oracle."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .validation import check_levels, check_shapes

SpatialShapes = torch.Tensor | Sequence[Sequence[int]]


def spatial_shape_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """Returns the ``(H, W)`` rows of ``spatial_shapes`` (an ``(L, 2)`` tensor or a sequence of pairs) as ints,
    symbolic ints (``torch.SymInt``) when traced with dynamic shapes (torch.export, ONNX export)."""
    rows = spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor) else spatial_shapes
    if any(not isinstance(row, (list, tuple)) or len(row) != 2 for row in rows):
        raise ValueError(f"spatial_shapes must hold (H, W) pairs, one per level, got {rows!r}")
    return [(_size(h), _size(w)) for h, w in rows]


def _size(x: int | torch.SymInt | torch.Tensor) -> int | torch.SymInt:
    return x if isinstance(x, torch.SymInt) else int(x)  # int() would fix a symbolic size to the traced one


def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample`` (bilinear, zero padding, align_corners=False).

    Args:
        value: ``(N, S, M, D)`` with ``S = sum_l H_l * W_l``, levels stacked in order.
        spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)``; a sequence of ``(H, W)`` int pairs is also
            accepted, which keeps the function traceable with symbolic sizes (ONNX export).
        level_start_index: ``(L,)`` start of each level in ``S`` (only its device is checked here).
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``; pixel ``x = loc_x * W_l - 0.5``.
        attention_weights: ``(N, Lq, M, L, P)``, normally softmaxed over ``L * P``.

    Returns:
        ``(N, Lq, M * D)`` in value's dtype. float16 / bfloat16 values are sampled and weighted in float32 (as the
        kernels accumulate), then cast back: torch's half-precision ``grid_sample`` on the CPU is inaccurate and can
        crash. A NaN or infinite location contributes zero, as in the kernels (``grid_sample`` would spread NaN).
    """
    check_shapes(value, sampling_locations, attention_weights, spatial_shapes, level_start_index)
    shapes = spatial_shape_list(spatial_shapes)
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    check_levels(shapes, s, n_levels)
    # Symbolic sizes: branches on their values would fix the graph to the traced image size.
    symbolic = any(isinstance(size, torch.SymInt) for hw in shapes for size in hw)
    if n == 0 or lq == 0:
        # Empty, but still connected to the inputs so that backward works.
        link = value.sum() + sampling_locations.sum() + attention_weights.sum()
        return value.new_zeros(n, lq, m * d) + 0 * link.to(value.dtype)

    out_dtype = value.dtype
    if value.dtype in (torch.float16, torch.bfloat16):
        value = value.float()
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    locations = sampling_locations.to(value.dtype)
    # A non-finite location is moved outside the map, where zero padding makes it contribute (and pass) nothing.
    locations = torch.where(locations.isfinite(), locations, torch.full_like(locations, -2.0))
    grids = 2 * locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        if not symbolic and h * w == 0:
            sampled.append(value.new_zeros(n * m, d, lq, n_points))
            continue
        v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)  # (N*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.to(value.dtype).transpose(1, 2).reshape(n * m, 1, lq, n_levels * n_points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous().to(out_dtype)
