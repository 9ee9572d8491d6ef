"""Sampling-point figures of a detector on one image: the decoder view (detections) and the encoder view (a pixel).

    outputs, records = run_recorded(model, image, cfg.data)
    figure = decoder_figure(model, records, outputs, image, layer=-1, top_k=5, threshold=0.3)

The figures are BGR images for ``cv2.imwrite``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from deformable import MSDeformAttn, SamplingRecord, cope_line_densities, recording
from deformable.inference.images import prepare_batch
from models.config import DataConfig

from . import draw
from .coords import query_at_pixel
from .sampling import QueryView, query_view, render, select_detections


@torch.no_grad()
def run_recorded(model: nn.Module, image: np.ndarray, data: DataConfig) -> tuple[dict, dict[str, SamplingRecord]]:
    """Runs ``model`` on one RGB image (validation resize and normalisation, no padding) while recording every
    ``MSDeformAttn``; returns ``(outputs, records)``."""
    images, mask = prepare_batch([image], data)
    device = next(model.parameters()).device
    with recording(model) as records:
        outputs = model(images.to(device), mask.to(device))
    return outputs, records


def attention_module(model: nn.Module, stack: str, layer: int) -> tuple[str, MSDeformAttn]:
    """``(name, module)`` of the deformable attention of ``stack`` ("encoder" or "decoder") layer ``layer``
    (negative counts from the last)."""
    if stack not in ("encoder", "decoder"):
        raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
    layers = getattr(model.transformer, stack).layers
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} does not exist: the {stack} has layers 0..{len(layers) - 1}")
    index = layer % len(layers)
    attr = "cross_attn" if stack == "decoder" else "self_attn"
    return f"transformer.{stack}.layers.{index}.{attr}", getattr(layers[index], attr)


def _with_densities(view: QueryView, module: MSDeformAttn, record: SamplingRecord, query: int) -> QueryView:
    """Adds the CoPE count densities along the reference row and column (valid cells only)."""
    if record.offset_mode != "cope":
        return view
    view.densities = [
        (row[:, :vw].double().cpu().numpy(), col[:, :vh].double().cpu().numpy())
        for (row, col), (_, _, vh, vw) in zip(
            cope_line_densities(module, record, 0, query), view.level_shapes, strict=True
        )
    ]
    return view


def decoder_figure(
    model: nn.Module,
    records: Mapping[str, SamplingRecord],
    outputs: dict,
    image: np.ndarray,
    *,
    layer: int = -1,
    top_k: int = 5,
    threshold: float = 0.3,
    color_by: str = "level",
    panels: bool = False,
    names: Mapping[int, str] | None = None,
    scale: int | None = None,
) -> np.ndarray:
    """The ``top_k`` detections scoring at least ``threshold`` (or, with a warning, the best query when none does):
    box, label, reference point and the sampling points of decoder layer ``layer``'s cross-attention. One panel
    per detection with ``panels``, else all on one image. Returns a BGR image."""
    name, module = attention_module(model, "decoder", layer)
    record = records[name]
    size = image.shape[:2]
    detections = select_detections(outputs, size, top_k, threshold)
    caption = f"{name}"
    if not detections:
        detections = select_detections(outputs, size, 1, 0.0)
        best = detections[0].score
        warnings.warn(f"no detection scores >= {threshold}; showing the best query (score {best:.3f})", stacklevel=2)
        caption += f"; no detection >= {threshold}, best query shown"
    views = []
    for det in detections:
        view = _with_densities(query_view(record, det.query, size), module, record, det.query)
        label = (names or {}).get(det.label, str(det.label))
        view.title, view.box = f"{label} {det.score:.2f} (q{det.query})", det.box
        views.append(view)
    if not panels:
        return render(image, views, color_by=color_by, scale=scale, caption=caption)
    figures = [render(image, [v], color_by=color_by, scale=scale, caption=caption) for v in views]
    return draw.tile(figures, columns=min(3, len(figures)))


def encoder_figure(
    model: nn.Module,
    records: Mapping[str, SamplingRecord],
    image: np.ndarray,
    pixel: tuple[float, float],
    *,
    layer: int = -1,
    query_level: int = 0,
    color_by: str = "level",
    scale: int | None = None,
) -> np.ndarray:
    """Where the encoder query of level ``query_level`` at image pixel ``pixel = (x, y)`` samples, every level, in
    encoder layer ``layer``. Returns a BGR image."""
    name, module = attention_module(model, "encoder", layer)
    record = records[name]
    size = image.shape[:2]
    x, y = pixel
    if not (0 <= x < size[1] and 0 <= y < size[0]):
        raise ValueError(f"pixel ({x:g}, {y:g}) is outside the image (width {size[1]}, height {size[0]})")
    # The centre of the pixel that holds (x, y): inside the image whenever (x, y) is, fractional or not.
    centre = (math.floor(x) + 0.5, math.floor(y) + 0.5)
    query = query_at_pixel(*centre, size, record.spatial_shapes, record.valid_ratios()[0], query_level)
    view = _with_densities(query_view(record, query, size), module, record, query)
    caption = f"{name}, query of level {query_level} at pixel ({x:g}, {y:g})"
    return render(image, [view], color_by=color_by, scale=scale, caption=caption)
