"""Shape checks shared by both paths; they read only metadata, so they are free under torch.compile."""

from __future__ import annotations

import torch


def check_shapes(
    value: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    spatial_shapes: object = None,
    level_start_index: object = None,
) -> None:
    """Raises ValueError/TypeError naming the problem when the op's tensors disagree in rank, size or device."""
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must have shape (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6:
        raise ValueError(
            "ms_deform_attn: sampling_locations must have shape (N, Lq, M, L, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            "ms_deform_attn: attention_weights must have shape (N, Lq, M, L, P), "
            f"got shape {tuple(attention_weights.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(f"ms_deform_attn: value must be a floating-point tensor, got {value.dtype}")
    for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise TypeError(f"ms_deform_attn: {name} must be a floating-point tensor, got {t.dtype}")
    n, _, m, _ = value.shape
    if sampling_locations.shape[0] != n:
        raise ValueError(
            f"ms_deform_attn: sampling_locations batch size {sampling_locations.shape[0]} "
            f"does not match value batch size {n}"
        )
    if sampling_locations.shape[2] != m:
        raise ValueError(
            f"ms_deform_attn: sampling_locations has {sampling_locations.shape[2]} heads but value has {m}"
        )
    if sampling_locations.shape[5] != 2:
        raise ValueError(
            "ms_deform_attn: the last dimension of sampling_locations must be 2 (x, y), "
            f"got {sampling_locations.shape[5]}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"ms_deform_attn: attention_weights has shape {tuple(attention_weights.shape)} but sampling_locations "
            f"{tuple(sampling_locations.shape)} requires (N, Lq, M, L, P) = {tuple(sampling_locations.shape[:5])}"
        )
    named = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if isinstance(t, torch.Tensor):
            named[name] = t
    if len({t.device for t in named.values()}) > 1:
        where = ", ".join(f"{name} {t.device}" for name, t in named.items())
        raise ValueError(f"ms_deform_attn: inputs are on different devices ({where})")
