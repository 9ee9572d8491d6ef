"""Position encodings of a feature map: the normalised sine encoding (the original's default) and a learned one."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of each pixel's (y, x) position inside the unpadded image region.

    Positions are cumulative counts of unpadded pixels, normalised as ``(count - 0.5) / (last + 1e-6) * scale``, so
    they span (0, scale] over the valid region whatever the padding.

    Args:
        num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels.
        temperature: base of the frequency ladder.
        normalize: normalise the positions by the valid extent (the original always does).
        scale: range of normalised positions (default ``2 * pi``).
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True, scale: float | None = None
    ) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: a scale needs normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encodes the positions of ``x``'s pixels.

        Args:
            x: ``(B, C, H, W)`` feature map (only its device is used).
            mask: ``(B, H, W)`` bool, True at padding.

        Returns:
            ``(B, 2 * num_pos_feats, H, W)`` float32: ``cat(pos_y, pos_x)`` channels, each with sin on even and cos
            on odd frequencies interleaved.
        """
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        pos_x = sine_encoding(x_embed, self.num_pos_feats, self.temperature)  # (B, H, W, F)
        pos_y = sine_encoding(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def sine_encoding(positions: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """The transformer's sine encoding of scalar positions (in radians): ``(...)`` -> ``(..., num_pos_feats)`` float32.

    Feature ``2i`` is ``sin(p / T^(2i/F))`` and ``2i + 1`` is ``cos(p / T^(2i/F))`` (sin and cos of one frequency
    interleaved), ``T`` the temperature and ``F`` ``num_pos_feats``. Used for the feature map's pixel positions
    (:class:`PositionEmbeddingSine`) and for the two-stage proposals and denoising boxes (``proposal_pos_embed``).
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    angles = positions[..., None] / dim_t
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: one embedding per row and per column (at most ``max_size`` of each).

    Args:
        num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels.
        max_size: the largest feature-map height and width supported.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encodes the positions of ``x``'s pixels (padding is ignored, as in the original).

        Args:
            x: ``(B, C, H, W)`` feature map, ``H, W <= max_size``.
            mask: ``(B, H, W)`` bool, unused.

        Returns:
            ``(B, 2 * num_pos_feats, H, W)``: ``cat(col, row)`` channels.
        """
        h, w = x.shape[-2:]
        max_size = self.row_embed.num_embeddings
        if h > max_size or w > max_size:
            raise ValueError(
                f"PositionEmbeddingLearned: feature map {h}x{w} is larger than the {max_size}x{max_size} it supports"
            )
        x_emb = self.col_embed(torch.arange(w, device=x.device))  # (W, F)
        y_emb = self.row_embed(torch.arange(h, device=x.device))  # (H, F)
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, -1, -1), y_emb.unsqueeze(1).expand(-1, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(cfg: Config) -> nn.Module:
    """``cfg.model.position_embedding``: "sine" (the original's ``v2``) or "learned" (``v3``)."""
    num_pos_feats = cfg.model.hidden_dim // 2
    kind = cfg.model.position_embedding
    if kind in ("sine", "v2"):
        return PositionEmbeddingSine(num_pos_feats, normalize=True)
    if kind in ("learned", "v3"):
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"model.position_embedding must be 'sine' or 'learned', got {kind!r}")
