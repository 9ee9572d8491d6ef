"""The deformable decoder: query self-attention, deformable cross-attention to the memory, FFN (post-norm),
with optional iterative box refinement."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .box_ops import inverse_sigmoid
from .deformable_encoder import make_deform_attn


class DeformableDecoderLayer(nn.Module):
    """Self-attention -> add & norm2 -> deformable cross-attention -> add & norm1 -> FFN -> add & norm3.

    The norm names follow the original's state_dict (norm2 comes first in the computation).
    """

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
        self.cross_attn = make_deform_attn(d_model, n_levels, n_heads, n_points, offset_mode, cope_channels)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        src_padding_mask: torch.Tensor | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``tgt``, ``query_pos``: ``(B, Q, C)``; reference_points ``(B, Q, L, 2 or 4)``; src ``(B, S, C)``;
        src_padding_mask ``(B, S)``; self_attn_mask ``(Q, Q)`` or ``(B * n_heads, Q, Q)`` bool, True where query i
        may not attend to query j (None: all attend to all) -> ``(B, Q, C)``."""
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(
            tgt + query_pos, reference_points, src, spatial_shapes, level_start_index, src_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableDecoder(nn.Module):
    """A stack of ``DeformableDecoderLayer`` returning every layer's output and reference points.

    ``bbox_embed`` (set by the detector for box refinement: one box MLP per layer) makes each layer refine the
    reference boxes: ``ref = sigmoid(bbox_embed[i](out) + inverse_sigmoid(ref))``, detached before the next layer.
    ``class_embed`` is registered by the two-stage detector only so that the state_dict matches the original's.
    """

    def __init__(self, layers: list[DeformableDecoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        query_pos: torch.Tensor,
        src_padding_mask: torch.Tensor | None = None,
        self_attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decodes the queries.

        Args:
            tgt: ``(B, Q, C)`` query content.
            reference_points: ``(B, Q, 2)`` points or ``(B, Q, 4)`` boxes ``(cx, cy, w, h)`` in [0, 1], relative to
                the valid (unpadded) image region.
            src: ``(B, S, C)`` memory; spatial_shapes ``(L, 2)``; level_start_index ``(L,)``.
            valid_ratios: ``(B, L, 2)`` ``(w, h)`` unpadded fraction per level.
            query_pos: ``(B, Q, C)``.
            src_padding_mask: ``(B, S)`` bool, True at padding.
            self_attn_mask: ``(Q, Q)`` or ``(B * n_heads, Q, Q)`` bool, True where query i may not attend to
                query j in self-attention (training-only extra queries); None: no mask.

        Returns:
            ``(hs, references)``: ``(num_layers, B, Q, C)`` outputs of each layer and ``(num_layers, B, Q, 2 or 4)``
            the reference points after each layer (unchanged without refinement).
        """
        output = tgt
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            scale = valid_ratios if reference_points.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            reference_points_input = reference_points[:, :, None] * scale[:, None]  # (B, Q, L, 2 or 4)
            output = layer(
                output,
                query_pos,
                reference_points_input,
                src,
                spatial_shapes,
                level_start_index,
                src_padding_mask,
                self_attn_mask,
            )
            if self.bbox_embed is not None:
                reference_points = refine_boxes(self.bbox_embed[lid](output), reference_points).detach()
            outputs.append(output)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


def refine_boxes(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` box deltas in inverse-sigmoid space + ``(..., 2 or 4)`` reference -> ``(..., 4)`` boxes.

    A 2-d reference offsets only the centre; the size comes from the delta alone.
    """
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()
