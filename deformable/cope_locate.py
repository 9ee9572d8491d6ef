"""``cope_locate``: where sampling points land for counted offsets along lines of count densities.

The native op (CPU and CUDA kernels, fake kernel, autograd) and its pure-PyTorch reference, which is both the
fallback and the test oracle. :class:`~deformable.cope_sampling.CoPESampling` computes the lines' cumulative counts
once per map; this op places every sampling point on them.

A line of W pixels has cumulative counts ``edges[l, 0..W]`` at its pixel edges (``edges[l, 0] = 0``, non-decreasing;
pixel k covers the edge coordinate ``[k, k + 1]``; outside ``[0, W]`` the count moves one per pixel). For row ``b``
(one query's head on one level), channel ``r`` on line ``lines[b, r]`` and point ``p``::

    c0 = count at the edge coordinate ref[b]
    x_r = the edge coordinate where the count reaches c0 + offsets[b, p]   (exact; a flat run is jumped to its end)
    out[b, p] = sum_r mix[b, r] * x_r

Each ``x_r`` is the exact inverse of the piecewise-linear count, monotone in the offset; so is a mix with
non-negative weights. With every density 1 (``edges[l, k] = k``) ``out = ref + offsets`` for weights summing to 1.
"""

from __future__ import annotations

import torch

from . import _extension
from .ops import use_native

DENSITY_FLOOR = 1e-12  # bounds 1 / density on a segment; a segment the search picks has positive density


def cope_locate_pytorch(
    edges: torch.Tensor, lines: torch.Tensor, ref: torch.Tensor, offsets: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """The reference: the same as :func:`cope_locate`, in PyTorch (memory ``O(B * R * P + Lines * W)``; when
    exporting, ``O(B * R * P * W)``: ONNX has no sorted search, so the segment is found by counting comparisons)."""
    n_lines, width1 = edges.shape
    width = width1 - 1
    flat = edges.reshape(-1)
    base = lines * width1  # (B, R)

    e = ref[:, None].expand_as(lines)  # (B, R)
    k0 = e.detach().floor().clamp(0, width - 1).long()
    low, high = flat[base + k0], flat[base + k0 + 1]
    total = flat[base + width]
    c0 = torch.where(e < 0, e, torch.where(e > width, total + (e - width), low + (e - k0) * (high - low)))
    t = c0[:, :, None] + offsets[:, None, :]  # (B, R, P)

    k = _segments(edges.detach(), lines, t.detach()) if torch.compiler.is_exporting() else _search(edges, lines, t)
    index = base[:, :, None] + k
    low, high = flat[index], flat[index + 1]
    inside = k.to(t.dtype) + (t - low) / (high - low).clamp_min(DENSITY_FLOOR)
    total = total[:, :, None]
    x = torch.where(t < 0, t, torch.where(t >= total, width + (t - total), inside))
    return (x * mix[:, :, None]).sum(1)


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


def cope_locate(
    edges: torch.Tensor, lines: torch.Tensor, ref: torch.Tensor, offsets: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """Edge coordinates of counted offsets, mixed over counting channels.

    Args:
        edges: ``(Lines, W + 1)`` float32/float64 cumulative counts of each line (see the module docstring).
        lines: ``(B, R)`` int64: the line of each row and channel, in ``[0, Lines)`` (checked on CPU; on CUDA an
            index outside it is undefined behaviour).
        ref: ``(B,)`` the reference edge coordinate of each row.
        offsets: ``(B, P)`` counted offsets from the reference.
        mix: ``(B, R)`` weights of the channels (non-negative for a monotone mix).

    Returns:
        ``(B, P)`` edge coordinates, in edges' dtype. Uses the compiled kernel when the extension has one for the
        device (and ``DEFORMABLE_BACKEND`` is not ``pytorch``), else :func:`cope_locate_pytorch`.
    """
    if not use_native(edges):
        return cope_locate_pytorch(edges, lines, ref, offsets, mix)
    return torch.ops.deformable.cope_locate(edges, lines, ref, offsets, mix)


def _check_fake(edges, lines, ref, offsets, mix) -> None:
    """The kernels' shape checks, for tracing (a traced call with bad shapes must fail, not return garbage).

    ``torch._check`` rather than ``if``: under torch.compile the line length can be a data-dependent size, which an
    ``if`` cannot branch on; ``torch._check`` records it as an assertion instead."""
    torch._check(edges.dim() == 2, lambda: f"cope_locate: edges must have shape (Lines, W + 1), got {edges.shape}")
    torch._check(edges.shape[1] >= 2, lambda: f"cope_locate: edges must have W >= 1, got {edges.shape}")
    torch._check(
        lines.dim() == 2 and mix.dim() == 2 and ref.dim() == 1 and offsets.dim() == 2,
        lambda: "cope_locate: lines and mix must be (B, R), ref (B,) and offsets (B, P)",
    )
    for name, size, expected in (
        ("mix", mix.shape[0], lines.shape[0]),
        ("mix", mix.shape[1], lines.shape[1]),
        ("ref", ref.shape[0], lines.shape[0]),
        ("offsets", offsets.shape[0], lines.shape[0]),
    ):
        torch._check(size == expected, lambda name=name: f"cope_locate: {name} does not match lines {lines.shape}")


def _output_like(edges, lines, ref, offsets, mix) -> torch.Tensor:
    return offsets.new_empty(offsets.shape)


if _extension.extension_loaded():
    # edges, lines, ref, offsets, mix
    _extension.register_native_op("cope_locate", _check_fake, _output_like, (True, False, True, True, True))
