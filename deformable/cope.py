"""CoPE, contextual position encoding (Golovneva et al., 2024): the 1-D block for causal attention.

Positions count the keys a query's gates let through instead of tokens: with ``g_ij = sigmoid(q_i . k_j)`` the
position of key j seen from query i is ``p_ij = sum_{t=j..i} g_it``, fractional, embedded by interpolating between
the integer positions. :class:`CoPE` returns the position term ``q_i . e[p_ij]`` that is added to the attention
logits. The 2-D deformable counterpart, which inverts the cumulative count to place sampling points, is
:mod:`deformable.cope_sampling`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cope_positions(gate_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Contextual positions ``p_ij = sum_{t=j..i} g_it`` (reverse cumulative sum over keys of the masked gates).

    Args:
        gate_logits: ``(..., Tq, Tk)`` gate logits, already scaled (``q . k / sqrt(d)`` in the paper's code).
        mask: ``(..., Tq, Tk)`` bool broadcastable, True where query i may see key j (causal: ``j <= i``).
            Keys outside the mask get gate 0, so the sum over ``t >= j`` stops at the query.

    Returns:
        ``(..., Tq, Tk)`` non-negative positions, non-increasing in j; with every gate 1 and a causal mask,
        ``p_ij = i - j + 1``.
    """
    gates = torch.sigmoid(gate_logits)
    if mask is not None:
        gates = gates * mask
    return gates.flip(-1).cumsum(-1).flip(-1)


def interpolate_position_logits(position_logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at fractional positions, linear between the integer ones.

    Args:
        position_logits: ``(..., Tq, npos_max)`` the logit ``q_i . e[n]`` of every integer position n.
        positions: ``(..., Tq, Tk)`` fractional positions in ``[0, npos_max - 1]``.

    Returns:
        ``(..., Tq, Tk)``: ``(p - floor p) * z[ceil p] + (1 - p + floor p) * z[floor p]``. The gradient reaches
        the positions (so the gates) through the interpolation weight only, as in the paper.
    """
    floor = positions.detach().floor()
    weight_ceil = positions - floor
    z_floor = position_logits.gather(-1, floor.long())
    z_ceil = position_logits.gather(-1, positions.detach().ceil().long())
    return z_ceil * weight_ceil + z_floor * (1 - weight_ceil)


class CoPE(nn.Module):
    """The contextual position term of one attention layer (shared across heads; gates and positions per head).

    Parameter (state_dict key): ``pos_emb`` ``(head_dim, npos_max)``, the embedding ``e[n]`` of integer position n
    as a column, zero-initialised so that a fresh layer starts as plain attention.

    Args:
        npos_max: number of integer positions; contextual positions are clipped to ``npos_max - 1``.
        head_dim: channels per head d.
    """

    def __init__(self, npos_max: int, head_dim: int) -> None:
        super().__init__()
        if npos_max < 1:
            raise ValueError(f"CoPE: npos_max must be >= 1, got {npos_max}")
        if head_dim < 1:
            raise ValueError(f"CoPE: head_dim must be >= 1, got {head_dim}")
        self.npos_max = npos_max
        self.head_dim = head_dim
        self.pos_emb = nn.Parameter(torch.zeros(head_dim, npos_max))

    def forward(self, query: torch.Tensor, attn_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Position logits to add to the attention logits before the softmax.

        Args:
            query: ``(B, Tq, head_dim)``, B = batch * heads.
            attn_logits: ``(B, Tq, Tk)`` unscaled ``q_i . k_j``; the gates are ``sigmoid(q . k / sqrt(d))``.
            mask: ``(B or 1, Tq, Tk)`` bool, True where query i may attend key j (e.g. causal ``j <= i``).

        Returns:
            ``(B, Tq, Tk)`` unscaled position logits ``q_i . e[p_ij]``; as in the paper's code the caller adds
            them to ``q . k`` and then divides the sum by ``sqrt(d)``.
        """
        if query.shape[-1] != self.head_dim:
            raise ValueError(f"CoPE: query must end in head_dim = {self.head_dim}, got {tuple(query.shape)}")
        if attn_logits.shape[:-1] != query.shape[:-1]:
            raise ValueError(
                f"CoPE: attn_logits {tuple(attn_logits.shape)} must be (B, Tq, Tk) with (B, Tq) of query "
                f"{tuple(query.shape)}"
            )
        positions = cope_positions(attn_logits / math.sqrt(self.head_dim), mask).clamp(max=self.npos_max - 1)
        position_logits = query @ self.pos_emb.to(query.dtype)  # (B, Tq, npos_max)
        return interpolate_position_logits(position_logits, positions)
