"""Recording what every ``MSDeformAttn`` of a model sampled: locations, attention weights and the inputs around them.

    with deformable.recording(model) as records:
        model(images, mask)
    rec = records["transformer.decoder.layers.5.cross_attn"]
    rec.sampling_locations  # (N, Lq, M, L, P, 2), exactly what ms_deform_attn received

The locations and weights are the tensors the module passed to the op (detached), not a recomputation, so a figure
drawn from them shows what the model did. Recording changes no output and works under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .cope_sampling import CoPESampling
from .modules import MSDeformAttn, valid_ratio
from .reference import spatial_shape_list

_FORWARD = inspect.signature(MSDeformAttn.forward)


@dataclass
class SamplingRecord:
    """One ``MSDeformAttn`` call (the last one inside the ``recording`` block).

    Attributes:
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` over each level's (padded) map.
        attention_weights: ``(N, Lq, M, L, P)``, softmaxed jointly over ``L * P``.
        sampling_offsets: ``(N, Lq, M, L, P, 2)`` the predicted offsets (pixels of the level, box fractions, or
            contextual counts in ``offset_mode="cope"``).
        reference_points: ``(N, Lq, L, 2)`` points or ``(N, Lq, L, 4)`` boxes, normalised over each level's padded
            map (already scaled by the valid ratios).
        spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``; level_start_index: ``(L,)`` int64.
        padding_mask: ``(N, S)`` bool, True at padding, or None.
        query: ``(N, Lq, C)``; input_flatten: ``(N, S, C)`` (what the CoPE gates are computed from).
        offset_mode: the module's ``"linear"`` or ``"cope"``.
    """

    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    sampling_offsets: torch.Tensor
    reference_points: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    padding_mask: torch.Tensor | None
    query: torch.Tensor
    input_flatten: torch.Tensor
    offset_mode: str = "linear"

    def valid_ratios(self) -> torch.Tensor:
        """``(N, L, 2)`` fraction ``(w, h)`` of each level's map that is image, not padding (as the model uses)."""
        n, s = self.input_flatten.shape[:2]
        mask = self.padding_mask if self.padding_mask is not None else torch.zeros(n, s, dtype=torch.bool)
        ratios = []
        for (h, w), start in zip(spatial_shape_list(self.spatial_shapes), self.level_start_index.tolist(), strict=True):
            ratios.append(valid_ratio(mask[:, start : start + h * w].view(n, h, w)).cpu())
        return torch.stack(ratios, 1)


def _collect(
    records: dict[str, SamplingRecord], name: str, module: MSDeformAttn, args: tuple, kwargs: dict, _output: Any
) -> None:
    """Forward hook: the module's own ``last_sampling`` plus its named inputs."""
    inputs = _FORWARD.bind(module, *args, **kwargs)
    inputs.apply_defaults()
    a = inputs.arguments
    sampled = module.last_sampling
    module.last_sampling = None
    mask = a["input_padding_mask"]
    records[name] = SamplingRecord(
        **sampled,
        reference_points=a["reference_points"].detach(),
        spatial_shapes=a["input_spatial_shapes"].detach(),
        level_start_index=a["input_level_start_index"].detach(),
        padding_mask=None if mask is None else mask.detach(),
        query=a["query"].detach(),
        input_flatten=a["input_flatten"].detach(),
        offset_mode=module.offset_mode,
    )


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[dict[str, SamplingRecord]]:
    """Records every ``MSDeformAttn`` submodule of ``model`` (``model`` itself included) while the block runs.

    Yields:
        A dict filled as the model runs: module name (as in ``model.named_modules()``, e.g.
        ``"transformer.encoder.layers.0.self_attn"``) -> :class:`SamplingRecord` of that module's last call.
    """
    records: dict[str, SamplingRecord] = {}
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MSDeformAttn)]
    handles = []
    try:
        for name, module in modules:
            module.record = True
            handles.append(module.register_forward_hook(partial(_collect, records, name), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for _, module in modules:
            module.record = False
            module.last_sampling = None


@torch.no_grad()
def cope_line_densities(
    module: MSDeformAttn, record: SamplingRecord, batch_index: int, query_index: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The count density along the row and the column through one query's reference point, per level.

    Evaluated by the module's own gate code (``CoPESampling.line_densities``) on the recorded inputs
    (``offset_mode="cope"`` only): the counting channels' densities weighted by the query's mix. Its cumulative sum
    from the reference point is the contextual coordinate the offsets count in (exactly so with one channel; with
    several the module mixes the channels' landing points).

    Returns:
        Per level ``(row (M, W_l), column (M, H_l))``: the density of every pixel of the line, 1 at padding.
    """
    cope = module.cope
    if not isinstance(cope, CoPESampling):
        raise ValueError(
            f"cope_line_densities needs an MSDeformAttn with offset_mode='cope', got {module.offset_mode!r}"
        )
    b, q = batch_index, query_index
    mask = None if record.padding_mask is None else record.padding_mask[b : b + 1]
    return cope.line_densities(
        record.query[b, q : q + 1],
        record.reference_points[b, q],
        record.input_flatten[b : b + 1],
        record.spatial_shapes,
        mask,
    )
