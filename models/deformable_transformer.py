"""The deformable transformer: flattens the multi-scale features, encodes them, prepares the queries (learned, or
two-stage proposals from the encoder) and decodes them."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from deformable import MSDeformAttn
from deformable.modules import valid_ratio

from .config import Config
from .deformable_decoder import DeformableDecoder, DeformableDecoderLayer
from .deformable_encoder import DeformableEncoder, DeformableEncoderLayer, encoder_reference_points
from .position_encoding import sine_encoding

if TYPE_CHECKING:
    from .training_queries import ExtraQueries

PROPOSAL_BASE_SIZE = 0.05  # two-stage proposal width/height at level 0, doubled per level
PROPOSAL_VALID_RANGE = (0.01, 0.99)


def proposal_pos_embed(proposals: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of proposal boxes: ``(B, Q, 4)`` in inverse-sigmoid space -> ``(B, Q, 4 * num_pos_feats)``,
    per coordinate sin on even and cos on odd frequencies interleaved."""
    return sine_encoding(proposals.sigmoid() * (2 * math.pi), num_pos_feats, temperature).flatten(2)  # (B, Q, 4F)


def encoder_proposals(
    memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal box per encoder position, and the memory with invalid positions zeroed.

    Args:
        memory: ``(B, S, C)``; padding_mask ``(B, S)`` bool; spatial_shapes ``(H_l, W_l)`` per level.

    Returns:
        ``(memory, proposals)``: ``(B, S, C)`` with padded or invalid positions set to 0, and ``(B, S, 4)``
        boxes ``(cx, cy, w, h)`` in inverse-sigmoid space: the pixel centre relative to the valid region and
        ``w = h = 0.05 * 2**level``; ``inf`` where padded or where any coordinate is outside (0.01, 0.99).
    """
    b = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start : start + h * w].view(b, h, w)
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2) as (x, y)
        scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * (PROPOSAL_BASE_SIZE * 2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(b, h * w, 4))  # h * w, not -1: b may be 0
        start += h * w
    proposals = torch.cat(proposals, 1)
    low, high = PROPOSAL_VALID_RANGE
    valid = ((proposals > low) & (proposals < high)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
    return memory, proposals


class DeformableTransformer(nn.Module):
    """Encoder, query preparation and decoder of Deformable DETR.

    Args:
        d_model: hidden size C.
        nhead: attention heads.
        num_encoder_layers, num_decoder_layers: depths.
        dim_feedforward: FFN width.
        dropout: dropout probability.
        num_feature_levels: levels L.
        enc_n_points, dec_n_points: sampling points per head and level.
        two_stage: take the queries from the top-scoring encoder proposals.
        two_stage_num_proposals: how many (the number of queries).
        enc_offset_mode, dec_offset_mode: ``MSDeformAttn`` offset mode ("linear" is the original's).
        cope_channels: counting channels per head where the offset mode is "cope".
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        two_stage: bool = False,
        two_stage_num_proposals: int = 300,
        enc_offset_mode: str = "linear",
        dec_offset_mode: str = "linear",
        cope_channels: int = 2,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        layer_args = dict(
            d_model=d_model,
            d_ffn=dim_feedforward,
            dropout=dropout,
            n_levels=num_feature_levels,
            n_heads=nhead,
            cope_channels=cope_channels,
        )
        self.encoder = DeformableEncoder(
            [
                DeformableEncoderLayer(**layer_args, n_points=enc_n_points, offset_mode=enc_offset_mode)
                for _ in range(num_encoder_layers)
            ]
        )
        self.decoder = DeformableDecoder(
            [
                DeformableDecoderLayer(**layer_args, n_points=dec_n_points, offset_mode=dec_offset_mode)
                for _ in range(num_decoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def forward(
        self,
        srcs: list[torch.Tensor],
        masks: list[torch.Tensor],
        pos_embeds: list[torch.Tensor],
        query_embed: torch.Tensor | None = None,
        enc_heads: tuple[nn.Module, nn.Module] | None = None,
        extra: ExtraQueries | None = None,
    ) -> dict[str, torch.Tensor]:
        """Runs the encoder and the decoder.

        Args:
            srcs: per level ``(B, C, H_l, W_l)`` projected features.
            masks: per level ``(B, H_l, W_l)`` bool, True at padding.
            pos_embeds: per level ``(B, C, H_l, W_l)`` position encodings.
            query_embed: ``(Q, 2C)`` learned queries, split into ``(query_pos, tgt)``; None in two-stage.
            enc_heads: two-stage only: the ``(class_head, box_head)`` scoring the encoder proposals.
            extra: training-only queries appended after the Q matching ones (after the two-stage top-k), decoded
                under ``extra.attn_mask``; None: the original's decoder.

        Returns:
            dict with ``hs (num_dec_layers, B, Q, C)``, ``init_reference (B, Q, 2 or 4)``, ``inter_references
            (num_dec_layers, B, Q, 2 or 4)`` (references in [0, 1] relative to the valid image region), and in
            two-stage ``enc_outputs_class (B, S, num_classes)`` and ``enc_outputs_coord_unact (B, S, 4)``. With
            ``extra`` the query axis holds Q + E queries, the matching ones first.
        """
        src, mask, pos, shapes = self._flatten(srcs, masks, pos_embeds)
        # torch.tensor, not as_tensor: traced with dynamic shapes (torch.export, ONNX), it builds the tensor from the
        # symbolic sizes, where as_tensor would bake the traced image's sizes in as a constant.
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)  # (B, L, 2)

        reference_points = encoder_reference_points(shapes, valid_ratios)
        memory = self.encoder(src, pos, reference_points, spatial_shapes, level_start_index, mask)

        out: dict[str, torch.Tensor] = {}
        if self.two_stage:
            if enc_heads is None:
                raise ValueError("DeformableTransformer: two-stage needs enc_heads=(class_head, box_head)")
            query_pos, tgt, reference_points = self._two_stage_queries(memory, mask, shapes, enc_heads, out)
        else:
            if query_embed is None:
                raise ValueError("DeformableTransformer: query_embed is required without two-stage")
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(src.shape[0], -1, -1)
            tgt = tgt.unsqueeze(0).expand(src.shape[0], -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        self_attn_mask = None
        if extra is not None:
            query_pos, tgt, reference_points = _append_extra(query_pos, tgt, reference_points, extra)
            self_attn_mask = extra.self_attn_mask(self.decoder.layers[0].self_attn.num_heads)
        out["init_reference"] = reference_points
        out["hs"], out["inter_references"] = self.decoder(
            tgt,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            query_pos,
            mask,
            self_attn_mask,
        )
        return out

    def _flatten(
        self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos_embeds: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Levels -> ``(B, S, C)`` features, ``(B, S)`` mask, ``(B, S, C)`` pos + level embedding, ``(H_l, W_l)``."""
        if not len(srcs) == len(masks) == len(pos_embeds) == self.level_embed.shape[0]:
            raise ValueError(
                f"DeformableTransformer: expected {self.level_embed.shape[0]} levels of srcs, masks and pos_embeds, "
                f"got {len(srcs)}, {len(masks)}, {len(pos_embeds)}"
            )
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds, strict=True)):
            shapes.append((src.shape[2], src.shape[3]))
            src_flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        return torch.cat(src_flat, 1), torch.cat(mask_flat, 1), torch.cat(pos_flat, 1), shapes

    def _two_stage_queries(
        self,
        memory: torch.Tensor,
        mask: torch.Tensor,
        shapes: list[tuple[int, int]],
        enc_heads: tuple[nn.Module, nn.Module],
        out: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores every encoder proposal, keeps the top ``two_stage_num_proposals`` by the first class logit and
        turns their (detached) boxes into queries. Adds ``enc_outputs_class``/``enc_outputs_coord_unact`` to out.

        Returns:
            ``(query_pos, tgt, reference_points)``: ``(B, Q, C)``, ``(B, Q, C)``, ``(B, Q, 4)`` boxes.
        """
        num_positions = memory.shape[1]
        topk = self.two_stage_num_proposals
        if topk > num_positions:
            raise ValueError(
                f"two-stage selects num_queries={topk} proposals but the encoder has only {num_positions} "
                f"positions: use a larger image or fewer queries"
            )
        output_memory, proposals = encoder_proposals(memory, mask, shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        class_head, box_head = enc_heads
        out["enc_outputs_class"] = class_head(output_memory)
        out["enc_outputs_coord_unact"] = box_head(output_memory) + proposals
        topk_index = torch.topk(out["enc_outputs_class"][..., 0], topk, dim=1)[1]  # (B, Q)
        topk_coords = torch.gather(out["enc_outputs_coord_unact"], 1, topk_index.unsqueeze(-1).expand(-1, -1, 4))
        topk_coords = topk_coords.detach()
        query = self.pos_trans_norm(self.pos_trans(proposal_pos_embed(topk_coords, self.d_model // 2)))
        query_pos, tgt = torch.split(query, self.d_model, dim=2)
        return query_pos, tgt, topk_coords.sigmoid()


def _append_extra(
    query_pos: torch.Tensor, tgt: torch.Tensor, reference_points: torch.Tensor, extra: ExtraQueries
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matching queries ``(B, Q, C)``, ``(B, Q, C)``, ``(B, Q, 2 or 4)`` followed by the extra ones."""
    b, q, c = tgt.shape
    e = extra.tgt.shape[1]
    expected = {"tgt": (b, e, c), "query_pos": (b, e, c), "reference_points": (b, e, reference_points.shape[-1])}
    for name, shape in expected.items():
        if tuple(getattr(extra, name).shape) != shape:
            raise ValueError(
                f"extra queries: {name} must be {shape} (batch, extra queries, and the matching queries' "
                f"{'width' if name != 'reference_points' else 'reference dimension'}), got "
                f"{tuple(getattr(extra, name).shape)}"
            )
    if tuple(extra.attn_mask.shape) != (q + e, q + e):
        raise ValueError(
            f"extra queries: attn_mask must be {(q + e, q + e)} for {q} matching and {e} extra queries, got "
            f"{tuple(extra.attn_mask.shape)} (were the aids built for another num_queries?)"
        )
    return (
        torch.cat([query_pos, extra.query_pos.to(query_pos.dtype)], 1),
        torch.cat([tgt, extra.tgt.to(tgt.dtype)], 1),
        torch.cat([reference_points, extra.reference_points.to(reference_points.dtype)], 1),
    )


def build_transformer(cfg: Config) -> DeformableTransformer:
    """``cfg.model``: hidden_dim, nheads, enc/dec_layers, dim_feedforward, dropout, num_feature_levels,
    enc/dec_n_points, two_stage, num_queries, enc/dec_offset_mode, cope_channels."""
    m = cfg.model
    return DeformableTransformer(
        d_model=m.hidden_dim,
        nhead=m.nheads,
        num_encoder_layers=m.enc_layers,
        num_decoder_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward,
        dropout=m.dropout,
        num_feature_levels=m.num_feature_levels,
        enc_n_points=m.enc_n_points,
        dec_n_points=m.dec_n_points,
        two_stage=m.two_stage,
        two_stage_num_proposals=m.num_queries,
        enc_offset_mode=m.enc_offset_mode,
        dec_offset_mode=m.dec_offset_mode,
        cope_channels=m.cope_channels,
    )
