"""``cope_locate``: where the sampling points of ``MSDeformAttn(offset_mode="cope")`` land, all levels and axes at once.

The native op (CPU and CUDA kernels, fake kernel, autograd) and its pure-PyTorch reference, which is both the
fallback and the test oracle. :class:`~deformable.cope_sampling.CoPESampling` computes the lines' cumulative counts
once per map; this op places every sampling point on them.

A line of W pixels has cumulative counts ``edges[l, 0..W]`` at its pixel edges (``edges[l, 0] = 0``, non-decreasing;
pixel k covers the edge coordinate ``[k, k + 1]``; outside ``[0, W]`` the count moves one per pixel). For a query's
head, level and axis, channel ``r`` reads the line through the query's reference point and point ``p``::

    c0 = count at the reference's edge coordinate e
    x_r = the edge coordinate where the count reaches c0 + u_p   (exact; a flat run is jumped to its end)
    location_p = sum_r mix_r * x_r / line length

Each ``x_r`` is the exact inverse of the piecewise-linear count, monotone in the offset; so is a mix with
non-negative weights. With every density 1 (``edges[l, k] = k``) ``x = e + u``: the plain module's locations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _extension
from .ops import use_native

DENSITY_FLOOR = 1e-12  # bounds 1 / density on a segment; a segment the search picks has positive density
# Added before flooring a reference's line index (in lines): a reference on the edge between two lines (every encoder
# point of a coarser level lies on one of a finer level) then reads the same line whichever way rounding left it,
# e.g. 7 and 6.9999995 with and without padding in the batch. The kernels use the same (kLineSnap).
LINE_SNAP = 1e-3


def line_across(v: torch.Tensor, n_lines: int) -> torch.Tensor:
    """The line a normalised reference coordinate ``v`` reads across its axis (int64, any shape):
    ``floor(v * n_lines + LINE_SNAP)`` clamped to ``[0, n_lines - 1]``; NaN reads line 0."""
    return (v.detach().nan_to_num(0.0) * n_lines + LINE_SNAP).floor().clamp(0, n_lines - 1).long()


def cope_locate_lines(
    edges: torch.Tensor, lines: torch.Tensor, ref: torch.Tensor, offsets: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """Edge coordinates of counted offsets on given lines, mixed over counting channels: the math of one line tensor
    of :func:`cope_locate`, in PyTorch (memory ``O(B * R * P + Lines * W)``; when exporting, ``O(B * R * P * W)``:
    ONNX has no sorted search, so the segment is found by counting comparisons; likewise on Apple's MPS, which has no
    float64 for the search's shifted keys: there a CoPE encoder at COCO sizes needs about a GB per level and axis,
    not measured on a Mac).

    Args:
        edges: ``(Lines, W + 1)`` cumulative counts of each line (see the module docstring).
        lines: ``(B, R)`` int64: the line of each row and channel, in ``[0, Lines)``.
        ref: ``(B,)`` the reference edge coordinate of each row.
        offsets: ``(B, P)`` counted offsets from the reference.
        mix: ``(B, R)`` weights of the channels (non-negative for a monotone mix).

    Returns:
        ``(B, P)`` edge coordinates.
    """
    n_lines, width1 = edges.shape
    width = width1 - 1
    flat = edges.reshape(-1)
    base = lines * width1  # (B, R)

    e = ref[:, None].expand_as(lines)  # (B, R)
    k0 = e.detach().floor().clamp(0, width - 1).long()
    total = flat[base + width]
    t = count_at(e, k0, flat[base + k0], flat[base + k0 + 1], total, width)[:, :, None] + offsets[:, None, :]

    # The search shifts lines apart in float64: a device without it (Apple's MPS) and exporters count edges instead.
    count_edges = torch.compiler.is_exporting() or edges.device.type == "mps"
    k = _segments(edges.detach(), lines, t.detach()) if count_edges else _search(edges, lines, t)
    index = base[:, :, None] + k
    x = edge_at(t, k, flat[index], flat[index + 1], total[:, :, None], width)  # (B, R, P)
    return (x * mix[:, :, None]).sum(1)


def count_at(
    e: torch.Tensor, k: torch.Tensor, low: torch.Tensor, high: torch.Tensor, total: torch.Tensor, width: int
) -> torch.Tensor:
    """The count at edge coordinate ``e`` of a line of ``width`` pixels, from pixel ``k`` (``floor(e)`` clamped to
    the line), the counts ``low`` / ``high`` at its edges and the line's ``total``: linear inside the pixel, one per
    pixel outside ``[0, width]``. All tensors broadcast."""
    return torch.where(e < 0, e, torch.where(e > width, total + (e - width), low + (e - k) * (high - low)))


def edge_at(
    t: torch.Tensor, k: torch.Tensor, low: torch.Tensor, high: torch.Tensor, total: torch.Tensor, width: int
) -> torch.Tensor:
    """The inverse of :func:`count_at`: the edge coordinate where the count reaches ``t``, given the pixel ``k`` the
    search found (the last with ``low <= t``) and the counts ``low`` / ``high`` at its edges; a flat pixel is jumped
    (its density is floored at ``DENSITY_FLOOR``). All tensors broadcast."""
    inside = k.to(t.dtype) + (t - low) / (high - low).clamp_min(DENSITY_FLOOR)
    return torch.where(t < 0, t, torch.where(t >= total, width + (t - total), inside))


def _search(edges: torch.Tensor, lines: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(B, R, P)`` the last k in ``[0, W - 1]`` with ``edges[lines, k] <= t`` (0 below the line).

    All lines are searched at once: each line's counts are shifted by its index times a span larger than any line's
    total, which makes the concatenation one sorted sequence (in float64, where the shifts are exact).
    """
    n_lines, width1 = edges.shape
    span = edges.detach().double()[:, -1].max().clamp_min(0) + 1
    keys = (torch.arange(n_lines, device=edges.device, dtype=torch.float64)[:, None] * span + edges.detach()).flatten()
    values = lines[:, :, None].double() * span + t.detach().double()
    index = torch.searchsorted(keys, values.contiguous(), right=True) - 1 - (lines * width1)[:, :, None]
    return index.clamp(0, width1 - 2)


def _segments(edges: torch.Tensor, lines: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The same as :func:`_search` by counting the edges at or below ``t`` (operators every exporter has)."""
    starts = edges[:, :-1][lines]  # (B, R, W): where each pixel's count starts
    return ((starts[:, :, None, :] <= t[..., None]).sum(-1) - 1).clamp(min=0)


LineLocate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cope_locate_pytorch(
    edges: Sequence[torch.Tensor],
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    mix: torch.Tensor,
    line_locate: LineLocate = cope_locate_lines,
) -> torch.Tensor:
    """The reference of :func:`cope_locate`: a loop over levels and axes of :func:`cope_locate_lines` (or
    ``line_locate``, which the counting probe's ablations replace)."""
    n, len_q, n_heads, n_levels, n_points, _ = offsets.shape
    channels = mix.shape[-1]
    device = offsets.device
    heads = torch.arange(n_heads, device=device).view(1, 1, n_heads, 1) * channels
    per_level = []
    for lvl in range(n_levels):
        ref = reference_points[:, :, lvl]
        per_axis = []
        for axis in (0, 1):
            line_edges = edges[2 * lvl + axis]
            size, n_lines = line_edges.shape[1] - 1, edges[2 * lvl + 1 - axis].shape[1] - 1
            across = line_across(ref[..., 1 - axis], n_lines)
            first = (torch.arange(n, device=device)[:, None] * n_lines + across) * (n_heads * channels)  # (N, Lq)
            index = first[:, :, None, None] + heads + torch.arange(channels, device=device)  # (N, Lq, M, R)
            u = offsets[:, :, :, lvl, :, axis]  # (N, Lq, M, P)
            if ref.shape[-1] == 4:  # box: u / P * half the box, in counts of an all-open line
                u = u * (ref[..., 2 + axis] * (size / (2 * n_points)))[:, :, None, None]
            e = (ref[..., axis] * size)[:, :, None].expand(-1, -1, n_heads)
            x = line_locate(
                line_edges,
                index.reshape(-1, channels),
                e.reshape(-1),
                u.reshape(-1, n_points),
                mix[:, :, :, axis].reshape(-1, channels),
            )
            per_axis.append(x.view(u.shape) / size)
        per_level.append(torch.stack(per_axis, -1))
    return torch.stack(per_level, 3)


def cope_locate(
    edges: Sequence[torch.Tensor], reference_points: torch.Tensor, offsets: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """Normalised sampling locations of counted offsets, every level and axis in one call.

    Args:
        edges: ``2 * L`` tensors, per level its x lines then its y lines: ``edges[2 l]`` is
            ``(N * H_l * M * R, W_l + 1)``, the cumulative counts along the rows (the line of image n, row i, head
            m, channel r at index ``((n * H_l + i) * M + m) * R + r``); ``edges[2 l + 1]`` is
            ``(N * W_l * M * R, H_l + 1)`` along the columns, likewise. float32 or float64.
        reference_points: ``(N, Lq, L, 2)`` normalised ``(x, y)`` or ``(N, Lq, L, 4)`` boxes ``(cx, cy, w, h)``:
            a point reads the row and column through its reference (clamped to the map); with boxes the offsets
            are scaled by ``w * W_l / (2 P)`` along x (likewise y).
        offsets: ``(N, Lq, M, L, P, 2)`` counted offsets ``(u_x, u_y)``.
        mix: ``(N, Lq, M, 2, R)`` each query's weights of the channels per head and axis (non-negative for a
            monotone mix).

    Returns:
        ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``, in offsets' dtype. Uses the compiled kernel when the
        extension has one for the device (and ``DEFORMABLE_BACKEND`` is not ``pytorch``), else
        :func:`cope_locate_pytorch`.
    """
    if not use_native(offsets):
        return cope_locate_pytorch(edges, reference_points, offsets, mix)
    return torch.ops.deformable.cope_locate(list(edges), reference_points, offsets, mix)


def _check_fake(edges, reference_points, offsets, mix) -> None:
    """The kernels' shape checks, for tracing (a traced call with bad shapes must fail, not return garbage).

    ``torch._check`` rather than ``if``: under torch.compile sizes can be symbolic, which an ``if`` cannot branch
    on; ``torch._check`` records it as an assertion instead."""
    torch._check(offsets.dim() == 6, lambda: f"cope_locate: offsets must be (N, Lq, M, L, P, 2), got {offsets.shape}")
    n, len_q, n_heads, n_levels = offsets.shape[:4]
    torch._check(
        reference_points.dim() == 4 and reference_points.shape[:3] == (n, len_q, n_levels),
        lambda: f"cope_locate: reference points {reference_points.shape} do not match offsets {offsets.shape}",
    )
    torch._check(
        mix.dim() == 5 and mix.shape[:4] == (n, len_q, n_heads, 2),
        lambda: f"cope_locate: mix must be (N, Lq, M, 2, R) to match offsets {offsets.shape}, got {mix.shape}",
    )
    torch._check(len(edges) == 2 * n_levels, lambda: f"cope_locate: edges must hold 2 * L = {2 * n_levels} tensors")
    for lvl in range(n_levels):
        for axis in (0, 1):
            lines, across = edges[2 * lvl + axis], edges[2 * lvl + 1 - axis]
            torch._check(
                lines.dim() == 2 and lines.shape[0] == n * (across.shape[1] - 1) * n_heads * mix.shape[4],
                lambda i=2 * lvl + axis: f"cope_locate: edges[{i}] has the wrong number of lines",
            )


def _output_like(edges, reference_points, offsets, mix) -> torch.Tensor:
    return offsets.new_empty(offsets.shape)


if _extension.extension_loaded():
    # edges, reference points, offsets, mix
    _extension.register_native_op("cope_locate", _check_fake, _output_like, (True, True, True, True))
