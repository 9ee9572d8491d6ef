"""CoPE for deformable sampling: offsets in contextual units along the row and column through the reference point.

A deformable head predicts an offset ``u`` from its reference point. In ``offset_mode="cope"`` ``u`` counts
*things*, not pixels. Every key position gets content-dependent gates, per head and counting channel r (R of them);
a gate times ``1 / sigmoid(gate_bias_init)`` is that pixel's count density, so along a line of the map the
cumulative sum of the densities is a contextual coordinate (the row gives x, the column gives y). The x of a
sampling point is where its row's count, taken from the reference point, reaches ``u_x``; each query mixes the R
channels' answers with its own non-negative weights, so what a query counts is its choice. With every density 1 the
count is the pixel coordinate and the module is the plain one, as relative position encoding is the special case of
CoPE (:mod:`deformable.cope`, the 1-D block).

Why it is cheap: the gates depend on the key only (the query's say is in the mix), so the cumulative counts of a
line are shared by every query on it and computed once per map (``O(S * M * R)``); the key's gate features are one
small projection (G channels) shared by every head, each head and channel reading it with its own gate query. A
sampling point then costs a binary search along its line for the pixel where the count reaches its target
(``O(log W)`` reads of a line in cache) and a division: the exact inverse of the piecewise-linear count. One fused op,
:func:`~deformable.cope_locate.cope_locate`, does the searches and the mix for every level and axis and returns the
locations. Nothing is of size queries x line length.

Conventions (pixel j of a line of length W covers the edge coordinate ``[j, j + 1]``, edge coordinate =
normalised coordinate * W, so pixel centres are at ``j + 0.5``): ``edges[k] = sum_{j<k} density_j`` is the count at
edge k; the count is linear inside a pixel with slope ``density_j``, and continues with slope 1 outside ``[0, W]``
(outside the map is zero padding to the sampler, as in the plain module).
"""

from __future__ import annotations

import torch
from torch import nn

from .cope_locate import cope_locate, line_across
from .reference import spatial_shape_list
from .validation import check_real, check_size

_RMS_EPS = 1e-6


def cumulative_counts(density: torch.Tensor) -> torch.Tensor:
    """``(..., W)`` non-negative per-pixel count density -> ``(..., W + 1)`` count at the pixel edges, from 0."""
    return torch.cat([density.new_zeros(density.shape[:-1] + (1,)), density.cumsum(-1)], -1)


class CoPESampling(nn.Module):
    """Sampling locations from contextual offsets (``MSDeformAttn(offset_mode="cope")``).

    Parameters (state_dict keys, under ``cope.`` in ``MSDeformAttn``):
        ``gate_key`` Linear(d_model, G): the gate key at every input position, shared by the heads; xavier, zero
        bias.
        ``gate_query`` ``(M, R, G)``: what each counting channel looks for in the keys; zero-initialised.
        ``gate_bias`` ``(M, L, R)``: per head, level and channel; initialised to ``gate_bias_init``.
        ``channel_mix`` Linear(d_model, M*2*R): each query's weights of the channels per head and axis (x, y),
        softmax over R; xavier-initialised, zero bias.

    Gate of key j for head m, channel r, level l, and its count density:
    ``g = sigmoid((k_j . gate_query_mr) / gate_temperature + bias_mlr)`` with ``k_j`` normalised to unit
    RMS, and ``density = g / sigmoid(gate_bias_init)``; a padded key's density is 1, whatever its content.

    Why this parametrisation: the zero gate queries make every gate ``sigmoid(gate_bias_init)`` at initialisation,
    so every density is exactly 1 and a fresh module samples where the plain one does, whatever the mix; the random
    mix weights each channel's gradient by different queries, so the channels do not stay copies of each other; the
    gates start half open (``gate_bias_init = 0``), where the sigmoid is steepest, and a fully open gate counts 2, so
    a single open pixel spans two integer counts and its centre is a table entry; there is no floor on the density,
    since any floor is a count that drifts with distance out of distribution. Padding counts as the map's outside
    does (one per pixel): an image's points land on the same pixels alone and padded in a batch, and a fresh module
    is the plain one on padded batches too.

    Units: with 2-d reference points ``u`` is in counts, one count per pixel at the initial gate level. With 4-d
    boxes ``u`` is scaled as the plain module scales pixels: ``u * w * W_l / (2 * P)`` counts along x (likewise y),
    so an initial box is ``2 * P`` units wide, as in the plain module.

    Cost: the gates ``O(S * G * (C + M * R))``, the cumulative counts ``O(S * M * R)`` per axis, and one short search
    per sampling point and channel (:func:`~deformable.cope_locate.cope_locate`).

    Args:
        d_model: hidden size C.
        n_levels, n_heads, n_points: L, M, P of the parent module.
        channels: counting channels R per head.
        gate_dim: channels G of the gate keys (shared by the heads).
        gate_bias_init: initial gate bias; also fixes the count unit (``sigmoid(gate_bias_init)`` = 1 count).
        gate_temperature: divides the gate logits ``k . gate_query``.
    """

    def __init__(
        self,
        d_model: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        channels: int = 2,
        gate_dim: int = 8,
        gate_bias_init: float = 0.0,
        gate_temperature: float = 0.05,
    ) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
            check_size("CoPESampling", name, value)
        for name, value in (("channels", channels), ("gate_dim", gate_dim)):
            check_size("CoPESampling", name, value)
        check_real("CoPESampling", "gate_bias_init", gate_bias_init)
        check_real("CoPESampling", "gate_temperature", gate_temperature, positive=True)
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.channels = channels
        self.gate_dim = gate_dim
        self.gate_bias_init = gate_bias_init
        self.logit_scale = 1.0 / gate_temperature
        # 1 / gate(gate_bias_init) = 1 + exp(-gate_bias_init): a fully open gate's count
        self.count_scale = 1.0 / float(self.gate(torch.tensor(gate_bias_init, dtype=torch.float64)))
        self.gate_key = nn.Linear(d_model, gate_dim)
        self.gate_query = nn.Parameter(torch.empty(n_heads, channels, gate_dim))
        self.gate_bias = nn.Parameter(torch.empty(n_heads, n_levels, channels))
        self.channel_mix = nn.Linear(d_model, n_heads * 2 * channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.gate_key.weight)
        nn.init.zeros_(self.gate_key.bias)
        nn.init.zeros_(self.gate_query)
        nn.init.constant_(self.gate_bias, self.gate_bias_init)
        nn.init.xavier_uniform_(self.channel_mix.weight)
        nn.init.zeros_(self.channel_mix.bias)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        """Gates in ``[0, 1]`` from their logits: the sigmoid (the counting probe's ablations replace it)."""
        return torch.sigmoid(logits)

    def locate(
        self, edges: list[torch.Tensor], reference_points: torch.Tensor, offsets: torch.Tensor, mix: torch.Tensor
    ) -> torch.Tensor:
        """Where the points land: :func:`~deformable.cope_locate.cope_locate` (the ablations replace it)."""
        return cope_locate(edges, reference_points, offsets, mix)

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
            padding_mask: ``(N, S)`` bool, True at padding (counted one per pixel, as outside the map).

        Returns:
            ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``.
        """
        coord = torch.float64 if query.dtype == torch.float64 else torch.float32
        shapes = spatial_shape_list(spatial_shapes)
        # Eager only: traced sizes may be symbolic, and a branch on them would fix the graph to one size.
        if not torch.compiler.is_compiling() and any(h * w == 0 for h, w in shapes):  # a count over no pixel
            raise ValueError(
                f"MSDeformAttn(offset_mode='cope'): spatial_shapes {shapes} has an empty level; CoPE counts along "
                "the rows and columns of every level and needs each to be at least 1 x 1 (offset_mode='linear' "
                "reads nothing from an empty level)"
            )
        edges = []
        for density in self.densities(input_flatten, shapes, padding_mask, coord):  # (N, H, W, M, R)
            n, h, w = density.shape[:3]
            per_line = n * self.n_heads * self.channels  # explicit sizes: no -1 to solve (sizes may be symbolic)
            edges.append(cumulative_counts(density.permute(0, 1, 3, 4, 2).reshape(per_line * h, w)))  # rows
            edges.append(cumulative_counts(density.permute(0, 2, 3, 4, 1).reshape(per_line * w, h)))  # columns
        mix = self.mix_weights(query, coord)  # (N, Lq, M, 2, R)
        return self.locate(edges, reference_points.to(coord), offsets.to(coord), mix)

    def densities(
        self,
        input_flatten: torch.Tensor,
        shapes: list[tuple[int, int]],
        padding_mask: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        """Count densities per level, ``(N, H_l, W_l, M, R)`` in ``dtype``: 1 at initialisation and at padding."""
        n, len_in, _ = input_flatten.shape
        keys = self.gate_key(input_flatten).to(dtype)  # (N, S, G)
        keys = keys * torch.rsqrt(keys.square().mean(-1, keepdim=True) + _RMS_EPS)
        queries = (self.gate_query.to(dtype) * self.logit_scale).reshape(-1, self.gate_dim)  # (M*R, G)
        logits = (keys @ queries.T).view(n, len_in, self.n_heads, self.channels)  # (N, S, M, R)
        padded = None if padding_mask is None else padding_mask[:, :, None, None]
        out, start = [], 0
        for lvl, (h, w) in enumerate(shapes):
            level = logits[:, start : start + h * w] + self.gate_bias[:, lvl].to(dtype)
            density = self.gate(level) * self.count_scale
            if padded is not None:
                density = density.masked_fill(padded[:, start : start + h * w], 1.0)
            out.append(density.view(n, h, w, self.n_heads, self.channels))
            start += h * w
        return out

    def mix_weights(self, query: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(N, Lq, M, 2, R)``: each query's weights of the counting channels per head and axis (sum 1)."""
        n, len_q, _ = query.shape
        logits = self.channel_mix(query).to(dtype).view(n, len_q, self.n_heads, 2, self.channels)
        # The softmax written out: torch.softmax over a last dimension of 2 is about 3x slower on CPU.
        weights = (logits - logits.detach().amax(-1, keepdim=True)).exp()
        return weights / weights.sum(-1, keepdim=True)

    @torch.no_grad()
    def line_densities(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One query's count density along the row and the column through its reference point, per level.

        The channels' densities weighted by the query's mix: with one channel (or channels that agree) the module
        places points exactly where this density's cumulative count reaches the offset; with several it mixes the
        channels' landing points, which this view shows as one density.

        Args:
            query: ``(1, C)``; reference_points ``(L, 2|4)``; input_flatten ``(1, S, C)``; padding_mask ``(1, S)``.

        Returns:
            Per level ``(row (M, W_l), column (M, H_l))``.
        """
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        shapes = spatial_shape_list(spatial_shapes)
        mix = self.mix_weights(query[None], dtype)[0, 0]  # (M, 2, R)
        out = []
        for lvl, density in enumerate(self.densities(input_flatten, shapes, padding_mask, dtype)):
            h, w = shapes[lvl]
            ref = reference_points[lvl].to(dtype)  # the dtype the module places its points in: the same lines
            row, col = int(line_across(ref[1], h)), int(line_across(ref[0], w))
            along_row = (density[0, row] * mix[None, :, 0]).sum(-1).T  # (M, W)
            along_col = (density[0, :, col] * mix[None, :, 1]).sum(-1).T  # (M, H)
            out.append((along_row, along_col))
        return out
