"""The deformable encoder: post-norm layers of multi-scale deformable self-attention and a ReLU FFN."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deformable import MSDeformAttn


def make_deform_attn(
    d_model: int, n_levels: int, n_heads: int, n_points: int, offset_mode: str, cope_channels: int = 2
) -> MSDeformAttn:
    """``MSDeformAttn``; ``offset_mode`` (and ``cope_channels``, the counting channels of ``"cope"``) are passed on
    only when it is not the original's "linear"."""
    extra = {} if offset_mode == "linear" else {"offset_mode": offset_mode, "cope_channels": cope_channels}
    return MSDeformAttn(d_model, n_levels, n_heads, n_points, **extra)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention -> add & norm1 -> FFN -> add & norm2 (dropout after attention and in the FFN)."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        offset_mode: str = "linear",
        cope_channels: int = 2,
    ) -> None:
        super().__init__()
        self.self_attn = make_deform_attn(d_model, n_levels, n_heads, n_points, offset_mode, cope_channels)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``src``, ``pos``: ``(B, S, C)``; reference_points ``(B, S, L, 2)``; padding_mask ``(B, S)``.

        Returns ``(B, S, C)``.
        """
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid (unpadded) extent, seen from every level.

    Args:
        spatial_shapes: ``(H_l, W_l)`` per level.
        valid_ratios: ``(B, L, 2)`` fraction ``(w, h)`` of each level that is not padding.

    Returns:
        ``(B, S, L, 2)`` ``(x, y)``: the centre ``(i + 0.5) / (valid_ratio * H)`` of each position of its own level
        (1.0 at the valid region's edge), times each level's valid ratio (the fraction of that level's padded map).
    """
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=valid_ratios.device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (B, H*W)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(points, 1)  # (B, S, 2)
    return reference_points[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """A stack of ``DeformableEncoderLayer`` over the flattened multi-scale features."""

    def __init__(self, layers: list[DeformableEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encodes the features.

        Args:
            src: ``(B, S, C)`` flattened features of all levels.
            pos: ``(B, S, C)`` position + level embeddings.
            reference_points: ``(B, S, L, 2)`` from :func:`encoder_reference_points`.
            spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``.
            level_start_index: ``(L,)`` int64.
            padding_mask: ``(B, S)`` bool, True at padding.

        Returns:
            ``(B, S, C)`` memory.
        """
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output
