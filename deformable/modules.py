"""``MSDeformAttn``: the original Deformable-DETR module, parameter- and checkpoint-compatible."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.init import constant_, xavier_uniform_

from .cope_sampling import CoPESampling
from .ops import ms_deform_attn
from .reference import SpatialShapes, spatial_shape_list
from .validation import check_size

OFFSET_MODES = ("linear", "cope")


def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` bool padding mask (True at padding) -> ``(B, 2)`` fraction ``(w, h)`` of unpadded columns and
    rows: the factor by which reference points normalised to the image are scaled into a padded level's map."""
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., 2021) with the original's parameters and initialisation.

    Parameters (state_dict keys): ``sampling_offsets`` Linear(d_model, M*L*P*2), ``attention_weights``
    Linear(d_model, M*L*P), ``value_proj`` and ``output_proj`` Linear(d_model, d_model). ``offset_mode="cope"`` adds
    ``cope.*`` (:class:`~deformable.cope_sampling.CoPESampling`: ``gate_key``, ``gate_query``, ``gate_bias``,
    ``channel_mix``) and nothing else.

    Args:
        d_model: hidden size C; must be divisible by ``n_heads``.
        n_levels: number of feature levels L.
        n_heads: number of attention heads M.
        n_points: sampling points P per head and level. These four are integers >= 1.
        offset_mode: ``"linear"`` (the original: offsets in pixels of the level, or box fractions) or ``"cope"``
            (offsets in contextual counts along the row and column through the reference point, see
            :mod:`deformable.cope_sampling`).
        cope_gate_dim: channels of the gate keys, shared by the heads (``"cope"`` only).
        cope_channels: counting channels per head that each query mixes (``"cope"`` only).
        The ``cope_*`` sizes are integers >= 1 where they are used.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        offset_mode: str = "linear",
        cope_gate_dim: int = 8,
        cope_channels: int = 2,
    ) -> None:
        super().__init__()
        _check_arguments(d_model, n_levels, n_heads, n_points, offset_mode, cope_gate_dim, cope_channels)
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                f"MSDeformAttn: channels per head ({head_dim}) is not a power of 2; the kernels are fastest with one",
                stacklevel=2,
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.offset_mode = offset_mode
        self.record = False  # set by deformable.recording(); forward then keeps last_sampling
        self.last_sampling: dict[str, torch.Tensor] | None = None

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()
        # Built after the original parameters so that linear mode draws the same random numbers.
        self.cope = (
            CoPESampling(d_model, n_levels, n_heads, n_points, channels=cope_channels, gate_dim=cope_gate_dim)
            if offset_mode == "cope"
            else None
        )

    def _reset_parameters(self) -> None:
        # Head m starts sampling along angle 2*pi*m/M, point i at distance i+1 (max-norm 1 direction).
        constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        constant_(self.attention_weights.weight, 0.0)
        constant_(self.attention_weights.bias, 0.0)
        xavier_uniform_(self.value_proj.weight)
        constant_(self.value_proj.bias, 0.0)
        xavier_uniform_(self.output_proj.weight)
        constant_(self.output_proj.bias, 0.0)
        # Builders that re-initialise every weight (the detector's xavier sweep) call this method afterwards,
        # so the gates must be reset here too. During __init__ the gates do not exist yet.
        cope = getattr(self, "cope", None)
        if cope is not None:
            cope.reset_parameters()

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: torch.Tensor | Sequence[int],
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attends from each query to P points per head and level around its reference.

        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` normalised ``(x, y)`` in [0, 1] (top-left (0, 0)), or
                ``(N, Lq, L, 4)`` normalised boxes ``(cx, cy, w, h)``.
            input_flatten: ``(N, S, C)``, levels flattened row-major and concatenated, ``S = sum_l H_l * W_l``.
            input_spatial_shapes: ``(L, 2)`` int64 rows ``(H_l, W_l)``, or a sequence of ``(H, W)`` int pairs.
            input_level_start_index: ``(L,)`` int64 start of each level in S, or a sequence of ints. Sequences
                become int64 tensors on input_flatten's device.
            input_padding_mask: ``(N, S)`` bool, True at padding (those values are zeroed).

        Returns:
            ``(N, Lq, C)``.
        """
        given_shapes = input_spatial_shapes  # a sequence of ints stays one for CoPE (static sizes when compiled)
        input_spatial_shapes, input_level_start_index = _level_tensors(
            input_spatial_shapes, input_level_start_index, input_flatten.device
        )
        self._check_inputs(query, reference_points, input_flatten, input_spatial_shapes, input_padding_mask)
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)  # (N, S, M, D)
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        if self.cope is None:
            locations = self._sampling_locations(reference_points, offsets, input_spatial_shapes)
        else:
            shapes = input_spatial_shapes if isinstance(given_shapes, torch.Tensor) else given_shapes
            locations = self.cope(query, reference_points, offsets, input_flatten, shapes, input_padding_mask)

        if self.record:  # what this call sampled, for deformable.recording() (visualisation)
            self.last_sampling = {
                "sampling_locations": locations.detach(),
                "attention_weights": weights.detach(),
                "sampling_offsets": offsets.detach(),
            }
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(output)

    def _sampling_locations(
        self, reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
    ) -> torch.Tensor:
        """Offsets ``(N, Lq, M, L, P, 2)`` in pixels of each level (or box fractions) -> normalised locations."""
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)  # (L, 2) as (W, H)
            return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        ref_xy = reference_points[:, :, None, :, None, :2]
        ref_wh = reference_points[:, :, None, :, None, 2:]
        return ref_xy + offsets / self.n_points * ref_wh * 0.5

    def _check_inputs(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        spatial_shapes: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> None:
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn: query must be (N, Lq, {self.d_model}), got {tuple(query.shape)}")
        if input_flatten.dim() != 3 or input_flatten.shape[-1] != self.d_model:
            raise ValueError(
                f"MSDeformAttn: input_flatten must be (N, S, {self.d_model}), got {tuple(input_flatten.shape)}"
            )
        n, len_q, _ = query.shape
        if input_flatten.shape[0] != n:
            raise ValueError(f"MSDeformAttn: query batch {n} != input_flatten batch {input_flatten.shape[0]}")
        expected_ref = (n, len_q, self.n_levels)
        if (
            reference_points.dim() != 4
            or tuple(reference_points.shape[:3]) != expected_ref
            or (reference_points.shape[-1] not in (2, 4))
        ):
            raise ValueError(
                f"MSDeformAttn: reference_points must be (N, Lq, L, 2) points or (N, Lq, L, 4) boxes with "
                f"(N, Lq, L) = {expected_ref}, got {tuple(reference_points.shape)}"
            )
        if tuple(spatial_shapes.shape) != (self.n_levels, 2):
            raise ValueError(
                f"MSDeformAttn: input_spatial_shapes must be ({self.n_levels}, 2), got {tuple(spatial_shapes.shape)}"
            )
        if not torch.compiler.is_compiling() and spatial_shapes.device.type == "cpu":
            # The op re-checks on every device; this catches the mismatch early with the module's names.
            total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
            if total != input_flatten.shape[1]:
                raise ValueError(
                    f"MSDeformAttn: input_spatial_shapes sum to {total} positions but input_flatten has "
                    f"{input_flatten.shape[1]}"
                )
        if padding_mask is not None:
            _check_padding_mask(padding_mask, tuple(input_flatten.shape[:2]))


def _level_tensors(
    shapes: SpatialShapes, starts: torch.Tensor | Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_spatial_shapes`` ``(L, 2)`` and ``input_level_start_index`` ``(L,)`` as the int64 tensors the op wants:
    sequences (``(H, W)`` pairs, which the op's PyTorch path takes too, and ints) are made tensors on ``device``."""
    if not isinstance(shapes, torch.Tensor):
        if not isinstance(shapes, Sequence):
            raise TypeError(
                "MSDeformAttn: input_spatial_shapes must be an (L, 2) int64 tensor or a sequence of (H, W) int "
                f"pairs, got {type(shapes).__name__}"
            )
        shapes = torch.tensor(spatial_shape_list(shapes), dtype=torch.int64, device=device).view(-1, 2)
    if not isinstance(starts, torch.Tensor):
        starts = torch.as_tensor(starts, dtype=torch.int64, device=device)
    return shapes, starts


def _check_padding_mask(padding_mask: object, expected: tuple[int, int]) -> None:
    """Raises TypeError / ValueError unless ``padding_mask`` is a bool tensor of shape ``expected`` ``(N, S)``."""
    if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
        got = padding_mask.dtype if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__
        raise TypeError(
            f"MSDeformAttn: input_padding_mask must be a torch.bool tensor of shape (N, S) = {expected}, True at "
            f"padding, got {got}"
        )
    if tuple(padding_mask.shape) != expected:
        raise ValueError(
            f"MSDeformAttn: input_padding_mask must be (N, S) = {expected}, got {tuple(padding_mask.shape)}"
        )


def _check_arguments(
    d_model: int, n_levels: int, n_heads: int, n_points: int, offset_mode: str, cope_gate_dim: int, cope_channels: int
) -> None:
    """Raises ValueError naming the first constructor argument of :class:`MSDeformAttn` that is out of range."""
    for name, value in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads), ("n_points", n_points)):
        check_size("MSDeformAttn", name, value)
    if d_model % n_heads != 0:
        raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
    if offset_mode not in OFFSET_MODES:
        raise ValueError(f"MSDeformAttn: offset_mode must be one of {OFFSET_MODES}, got {offset_mode!r}")
    if offset_mode == "cope":  # ignored otherwise, as documented
        check_size("MSDeformAttn", "cope_gate_dim", cope_gate_dim)
        check_size("MSDeformAttn", "cope_channels", cope_channels)
