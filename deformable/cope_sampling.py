"""CoPE for deformable sampling: offsets in contextual units along the row and column through the reference point.

A deformable head predicts an offset ``u`` from its reference point. In ``offset_mode="cope"`` ``u`` counts
*things*, not pixels: per head and level, gates between the query and the keys on the horizontal line through the
reference point give a count density per pixel; its cumulative sum, taken from the reference point, is a contextual
x coordinate, and the x of the sampling point is where that count reaches ``u_x`` (the vertical line gives y). The
inverse of the monotone, piecewise-linear cumulative count is exact and piecewise linear, so gradients reach the
gates through it and through the bilinear sampling. With every density 1 the count is the pixel coordinate and the
module is the plain one, as relative position encoding is the special case of CoPE.

The 1-D block (:mod:`deformable.cope`) turns gates into positions by a cumulative sum and reads a position
embedding at those fractional positions by linear interpolation; here the cumulative sum runs along the image line
and the interpolation is inverted: a fractional count is turned into a fractional pixel coordinate.

Conventions (pixel j of a line of length W covers the edge coordinate ``[j, j + 1]``, edge coordinate =
normalised coordinate * W, so pixel centres are at ``j + 0.5``): ``edges[k] = sum_{j<k} density_j`` is the count at
edge k; the count is linear inside a pixel with slope ``density_j``, and continues with slope 1 outside ``[0, W]``
(outside the map is zero padding to the sampler, as in the plain module).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .reference import spatial_shape_list

_RMS_EPS = 1e-6
_DENSITY_FLOOR = 1e-12  # keeps the inverse finite where a segment has zero width (never selected by the search)


def cumulative_counts(density: torch.Tensor) -> torch.Tensor:
    """``(..., W)`` non-negative per-pixel count density -> ``(..., W + 1)`` count at the pixel edges, from 0."""
    return torch.cat([density.new_zeros(density.shape[:-1] + (1,)), density.cumsum(-1)], -1)


def pixels_to_counts(edges: torch.Tensor, density: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
    """The cumulative count at edge coordinates ``coord``.

    Args:
        edges: ``(B, W + 1)`` from :func:`cumulative_counts`.
        density: ``(B, W)``.
        coord: ``(B, K)`` edge coordinates (normalised coordinate * W); slope 1 outside ``[0, W]``.

    Returns:
        ``(B, K)``.
    """
    width = density.shape[-1]
    k = coord.detach().floor().clamp(0, width - 1).long()
    inside = edges.gather(-1, k) + (coord - k.to(coord.dtype)) * density.gather(-1, k)
    above = edges[..., -1:] + (coord - width)
    return torch.where(coord < 0, coord, torch.where(coord > width, above, inside))


def counts_to_pixels(edges: torch.Tensor, density: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pixels_to_counts`: the edge coordinate where the cumulative count equals ``count``.

    The pixel is found by binary search over the monotone edge counts and the coordinate inside it by linear
    interpolation, so the result is exact for the piecewise-linear count. Where the count is flat (zero density,
    e.g. padding) the search returns the end of the flat run.

    Args:
        edges: ``(B, W + 1)`` non-decreasing, ``edges[:, 0] = 0``.
        density: ``(B, W)``, ``edges = cumulative_counts(density)``.
        count: ``(B, K)`` target counts.

    Returns:
        ``(B, K)`` edge coordinates; gradients flow to ``count``, ``edges`` and ``density``.
    """
    width = density.shape[-1]
    index = torch.searchsorted(edges.detach(), count.detach().contiguous(), right=True)  # edges[i-1] <= c < edges[i]
    k = (index - 1).clamp(0, width - 1)
    slope = density.gather(-1, k).clamp_min(_DENSITY_FLOOR)
    inside = k.to(count.dtype) + (count - edges.gather(-1, k)) / slope
    total = edges[..., -1:]
    return torch.where(count < 0, count, torch.where(count >= total, width + (count - total), inside))


def contextual_offsets_to_pixels(density: torch.Tensor, ref: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Moves ``offsets`` counts from ``ref`` along a line of count density ``density``.

    Args:
        density: ``(B, W)`` non-negative count per pixel of the line.
        ref: ``(B, 1)`` reference edge coordinate (normalised * W).
        offsets: ``(B, K)`` signed contextual offsets; 0 maps to ``ref`` where the density there is positive.

    Returns:
        ``(B, K)`` edge coordinates of the points whose count from ``ref`` equals ``offsets``; with every density 1
        this is ``ref + offsets``.
    """
    edges = cumulative_counts(density)
    target = pixels_to_counts(edges, density, ref) + offsets
    return counts_to_pixels(edges, density, target)


class CoPESampling(nn.Module):
    """Sampling locations from contextual offsets (``MSDeformAttn(offset_mode="cope")``).

    Parameters (state_dict keys, under ``cope.`` in ``MSDeformAttn``):
        ``gate_query`` Linear(d_model, M*2*G): a gate query per head and axis (x, y); zero-initialised.
        ``gate_key`` Linear(d_model, M*G): a gate key per head at every input position; xavier, zero bias.
        ``gate_bias`` ``(M, L, 2)``: per head, level and axis; initialised to ``gate_bias_init``.

    Gate of key j on the line (row for x, column for y) through the reference point, and its count density:
    ``g_j = sigmoid(q . k_j / (sqrt(G) * gate_temperature) + gate_bias)`` with ``k_j`` normalised to unit RMS per
    head, and ``density_j = g_j * valid_j / sigmoid(gate_bias_init)`` (``valid_j`` 0 at padded keys). The reference
    point's own pixel has density 1 (offsets under half a count stay in it, as pixel offsets would).

    Why this parametrisation (measured with ``tools/experiments/cope_counting.py``; BENCHMARKS.md, CoPE offsets):
    the zero gate query makes every gate ``sigmoid(gate_bias_init)`` at initialisation, so every density is exactly
    1 and a fresh module samples where the plain one does; the gates start half open (``gate_bias_init = 0``), where
    the sigmoid is steepest (open gates at start stall on pixel-like solutions); a temperature of 1/4 on
    RMS-normalised keys lets the gates separate before the offsets settle; and there is no floor on the density,
    since any floor is a count that drifts with distance out of distribution.

    Units: with 2-d reference points ``u`` is in counts, one count per pixel at the initial gate level (a fully
    open key counts ``1 / sigmoid(gate_bias_init)`` = 2, a closed one 0). With 4-d boxes ``u`` is scaled as the
    plain module scales pixels: ``u * w * W_l / (2 * P)`` counts along x (likewise y), so an initial box is
    ``2 * P`` units wide, as in the plain module.

    Cost: per level, the gates of each query's row and column, ``(N, Lq, M, W_l + H_l)``, computed from
    gathered ``(N, Lq, M, W_l + H_l, G)`` keys in chunks of queries (recomputed in backward when there are several
    chunks), so time is linear in ``Lq * (H_l + W_l)`` and memory is bounded by ``chunk_elements``.

    Args:
        d_model: hidden size C.
        n_levels, n_heads, n_points: L, M, P of the parent module.
        gate_dim: channels G of the gate queries and keys per head.
        gate_bias_init: initial gate bias; also fixes the count unit (``sigmoid(gate_bias_init)`` = 1 count).
        gate_temperature: divides the gate logits ``q . k / sqrt(G)``.
    """

    chunk_elements = 1 << 25  # bound on the gathered keys, queries * M * line length * G, per chunk

    def __init__(
        self,
        d_model: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        gate_dim: int = 8,
        gate_bias_init: float = 0.0,
        gate_temperature: float = 0.25,
    ) -> None:
        super().__init__()
        if gate_dim < 1:
            raise ValueError(f"CoPESampling: gate_dim must be >= 1, got {gate_dim}")
        if gate_temperature <= 0:
            raise ValueError(f"CoPESampling: gate_temperature must be > 0, got {gate_temperature}")
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.gate_dim = gate_dim
        self.gate_bias_init = gate_bias_init
        self.logit_scale = 1.0 / (math.sqrt(gate_dim) * gate_temperature)
        self.count_scale = 1.0 + math.exp(-gate_bias_init)  # 1 / sigmoid(gate_bias_init)
        self.gate_query = nn.Linear(d_model, n_heads * 2 * gate_dim)
        self.gate_key = nn.Linear(d_model, n_heads * gate_dim)
        self.gate_bias = nn.Parameter(torch.empty(n_heads, n_levels, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate_query.weight)
        nn.init.zeros_(self.gate_query.bias)
        nn.init.xavier_uniform_(self.gate_key.weight)
        nn.init.zeros_(self.gate_key.bias)
        nn.init.constant_(self.gate_bias, self.gate_bias_init)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        offsets: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised sampling locations.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` normalised ``(x, y)`` or ``(N, Lq, L, 4)`` boxes ``(cx, cy, w, h)``.
            offsets: ``(N, Lq, M, L, P, 2)`` contextual offsets ``(u_x, u_y)``.
            input_flatten: ``(N, S, C)``.
            spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)``.
            padding_mask: ``(N, S)`` bool, True at padding (never counted).

        Returns:
            ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``.
        """
        n, len_q, _ = query.shape
        m, g = self.n_heads, self.gate_dim
        coord = torch.float64 if query.dtype == torch.float64 else torch.float32
        shapes = spatial_shape_list(spatial_shapes)
        keys = self.gate_keys(input_flatten, coord)
        valid = None if padding_mask is None else (~padding_mask).to(coord)
        lines = self._lines(keys, valid, shapes)
        queries = self.gate_query(query).to(coord).view(n, len_q, m, 2, g)
        offsets = offsets.to(coord)
        reference_points = reference_points.to(coord)

        longest = max([max(h, w) for h, w in shapes] + [1])
        chunk = max(1, self.chunk_elements // max(1, n * m * g * longest))
        pieces = []
        for start in range(0, len_q, chunk):
            args = (queries[:, start : start + chunk], reference_points[:, start : start + chunk])
            args += (offsets[:, start : start + chunk], lines)
            if torch.is_grad_enabled() and len_q > chunk:
                # Recompute each chunk's gathered keys and gates in backward: memory stays O(chunk), not O(Lq).
                pieces.append(checkpoint(self._locate, *args, use_reentrant=False))
            else:
                pieces.append(self._locate(*args))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)

    def gate_keys(self, input_flatten: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Gate keys ``(N, S, M, G)`` of ``input_flatten`` ``(N, S, C)``, unit RMS per head, in ``dtype``."""
        n, len_in, _ = input_flatten.shape
        keys = self.gate_key(input_flatten).to(dtype).view(n, len_in, self.n_heads, self.gate_dim)
        return keys * torch.rsqrt(keys.square().mean(-1, keepdim=True) + _RMS_EPS)

    def _lines(self, keys: torch.Tensor, valid: torch.Tensor | None, shapes: list[tuple[int, int]]) -> list[tuple]:
        """Per level: keys as rows ``(N*H, M*W*G)`` and columns ``(N*W, M*H*G)``, validity likewise."""
        n, _, m, g = keys.shape
        lines, start = [], 0
        for h, w in shapes:
            k = keys[:, start : start + h * w].view(n, h, w, m, g)
            rows = k.permute(0, 1, 3, 2, 4).reshape(n * h, m * w * g)  # row y: (M, W, G)
            cols = k.permute(0, 2, 3, 1, 4).reshape(n * w, m * h * g)  # column x: (M, H, G)
            v_rows = v_cols = None
            if valid is not None:
                v = valid[:, start : start + h * w].view(n, h, w)
                v_rows, v_cols = v.reshape(n * h, w), v.transpose(1, 2).reshape(n * w, h)
            lines.append((h, w, rows, cols, v_rows, v_cols))
            start += h * w
        return lines

    def _locate(
        self, queries: torch.Tensor, reference_points: torch.Tensor, offsets: torch.Tensor, lines: list[tuple]
    ) -> torch.Tensor:
        """One chunk of queries: ``(N, Lc, M, 2, G)``, ``(N, Lc, L, 2|4)``, ``(N, Lc, M, L, P, 2)`` -> locations."""
        per_level = []
        for lvl, (h, w, rows, cols, v_rows, v_cols) in enumerate(lines):
            ref = reference_points[:, :, lvl]  # (N, Lc, 2|4)
            row = (ref[..., 1].detach() * h).floor().clamp(0, h - 1).long()  # the lines through the reference point
            col = (ref[..., 0].detach() * w).floor().clamp(0, w - 1).long()
            axes = ((w, h, rows, v_rows, row), (h, w, cols, v_cols, col))  # x along the row, y along the column
            xy = []
            for axis, (size, n_lines, keys, valid, index) in enumerate(axes):
                density = self._density(queries[:, :, :, axis], keys, valid, index, n_lines, lvl, axis)
                # The reference's own pixel counts 1: offsets under half a count stay inside it, as pixel offsets
                # would, so small offsets never jump to the next open key however closed the gates around are.
                own = torch.arange(size, device=density.device) == (col if axis == 0 else row)[:, :, None, None]
                density = torch.where(own, torch.ones_like(density), density)
                u = offsets[:, :, :, lvl, :, axis]  # (N, Lc, M, P)
                if ref.shape[-1] == 4:  # box: u / P * half the box, in counts of an all-open line
                    u = u * (ref[..., 2 + axis] * (size / (2 * self.n_points)))[:, :, None, None]
                e_ref = (ref[..., axis] * size)[:, :, None, None].expand(-1, -1, self.n_heads, 1)
                e = contextual_offsets_to_pixels(density.flatten(0, 2), e_ref.flatten(0, 2), u.flatten(0, 2))
                xy.append(e.view_as(u) / size)
            per_level.append(torch.stack(xy, -1))  # (N, Lc, M, P, 2)
        return torch.stack(per_level, 3)

    def _density(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        valid: torch.Tensor | None,
        index: torch.Tensor,
        n_lines: int,
        lvl: int,
        axis: int,
    ) -> torch.Tensor:
        """Count density ``(N, Lc, M, size)`` along each query's line ``index`` ``(N, Lc)`` of one level and axis.

        ``queries`` ``(N, Lc, M, G)``; ``keys`` ``(N*n_lines, M*size*G)``; ``valid`` ``(N*n_lines, size)`` or None.
        """
        n, len_c, m, g = queries.shape
        size = keys.shape[1] // (m * g)
        flat = (torch.arange(n, device=index.device)[:, None] * n_lines + index).flatten()  # (N*Lc,)
        line_keys = keys.index_select(0, flat).view(n * len_c * m, size, g)
        logits = (line_keys @ queries.reshape(n * len_c * m, g, 1)).view(n, len_c, m, size) * self.logit_scale
        gates = torch.sigmoid(logits + self.gate_bias[:, lvl, axis, None].to(logits.dtype))
        if valid is not None:
            gates = gates * valid.index_select(0, flat).view(n, len_c, 1, size)
        return gates * self.count_scale
