"""The paper's figure: a query's reference point (cross), its sampling points for every head and level coloured by
level or head with size and opacity growing with the attention weight, the detected box on top, and in
``offset_mode="cope"`` the count density along the reference point's row and column as strips.

Everything comes from a :class:`deformable.SamplingRecord` (what the model sampled) mapped to original image
pixels with :mod:`deformable.viz.coords`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from deformable import SamplingRecord

from . import draw
from .coords import image_to_canvas, level_to_image

COLOR_BY = ("level", "head")
STRIP_ROW = 4  # strip height (pixels) per head
TARGET_SIDE = 720  # auto scale: small images are enlarged by an integer factor to about this longer side


@dataclass
class Detection:
    """One query's prediction: ``box`` ``(4,)`` xyxy in original image pixels."""

    query: int
    label: int
    score: float
    box: np.ndarray


@dataclass
class QueryView:
    """One query's sampling in original image pixels (continuous coordinates, pixel j spans ``[j, j + 1]``).

    Attributes:
        reference: ``(2,)`` reference point ``(x, y)``.
        points: ``(M, L, P, 2)`` sampling points; weights: ``(M, L, P)`` attention weights.
        level_shapes: per level ``(H_l, W_l, valid H_l, valid W_l)``.
        title: label text; box: ``(4,)`` xyxy or None.
        densities: ``offset_mode="cope"``: per level ``(row (M, valid W_l), column (M, valid H_l))``.
    """

    reference: np.ndarray
    points: np.ndarray
    weights: np.ndarray
    level_shapes: list[tuple[int, int, int, int]]
    title: str = ""
    box: np.ndarray | None = None
    densities: list[tuple[np.ndarray, np.ndarray]] | None = field(default=None)


def select_detections(
    outputs: dict, image_size: tuple[int, int], top_k: int, threshold: float, batch_index: int = 0
) -> list[Detection]:
    """The ``top_k`` queries whose best class scores at least ``threshold``, best first.

    ``outputs``: ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)`` normalised cxcywh of the valid region.
    """
    prob = outputs["pred_logits"][batch_index].detach().float().sigmoid().cpu()
    scores, labels = prob.max(-1)
    order = torch.argsort(scores, descending=True)[:top_k]
    height, width = image_size
    boxes = outputs["pred_boxes"][batch_index].detach().float().cpu().numpy()
    found = []
    for q in order.tolist():
        if float(scores[q]) < threshold:
            break
        cx, cy, w, h = boxes[q]
        xyxy = np.array([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
        found.append(Detection(q, int(labels[q]), float(scores[q]), xyxy))
    return found


def query_view(record: SamplingRecord, query: int, image_size: tuple[int, int], batch_index: int = 0) -> QueryView:
    """The sampling of query ``query`` of image ``batch_index`` in ``record``, in original image pixels."""
    b = batch_index
    ratios = record.valid_ratios()[b]  # (L, 2)
    points = level_to_image(record.sampling_locations[b, query], ratios[None, :, None, :], image_size)
    reference = level_to_image(record.reference_points[b, query, :, :2], ratios, image_size)[0]
    shapes = []
    for (h, w), (rw, rh) in zip(record.spatial_shapes.tolist(), ratios.tolist(), strict=True):
        shapes.append((h, w, max(1, round(rh * h)), max(1, round(rw * w))))
    weights = record.attention_weights[b, query].detach().float().cpu().numpy()
    return QueryView(reference, points, weights, shapes)


def canvas_scale(image_size: tuple[int, int]) -> int:
    """Integer enlargement so that small images are readable (1 for images already near ``TARGET_SIDE``)."""
    return max(1, round(TARGET_SIDE / max(image_size)))


def render(
    image: np.ndarray,
    views: Sequence[QueryView],
    *,
    color_by: str = "level",
    scale: int | None = None,
    caption: str = "",
) -> np.ndarray:
    """Draws ``views`` on the RGB ``image`` ``(H, W, 3)``; returns a BGR figure with a legend (and the CoPE strips
    of the first view when it has densities)."""
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {COLOR_BY}, got {color_by!r}")
    scale = scale or canvas_scale(image.shape[:2])
    canvas = enlarge(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), scale)
    for view in views:
        draw_view(canvas, view, scale, color_by)
    if views and views[0].densities is not None:
        canvas = with_strips(canvas, views[0], image.shape[:2], scale)
    return draw.stack([canvas, draw.legend(legend_entries(views, color_by, caption), canvas.shape[1])])


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Integer nearest-neighbour enlargement: image pixel j covers canvas pixels ``[j * scale, (j + 1) * scale)``."""
    if scale == 1:
        return image.copy()
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def draw_view(canvas: np.ndarray, view: QueryView, scale: float, color_by: str = "level") -> None:
    """Sampling points, reference cross, then box and label of one view, in place."""
    m, n_levels, p, _ = view.points.shape
    xy = image_to_canvas(view.points.reshape(-1, 2), scale)
    index = np.arange(m * n_levels * p).reshape(m, n_levels, p)
    groups = index // (n_levels * p) if color_by == "head" else (index // p) % n_levels
    colours = [draw.colour(int(g)) for g in groups.reshape(-1)]
    weights = view.weights.reshape(-1)
    strengths = weights / max(float(weights.max()), 1e-12)
    radius = max(3.0, 2.0 * scale**0.5 + 2.0)
    draw.draw_points(canvas, xy, colours, strengths, max_radius=radius)
    rx, ry = image_to_canvas(view.reference, scale)
    draw.draw_cross(canvas, rx, ry, draw.WHITE, size=radius + 2)
    if view.box is not None:
        draw.draw_box(canvas, box_to_canvas(view.box, scale), draw.WHITE, view.title)


def box_to_canvas(box: np.ndarray, scale: float) -> np.ndarray:
    """``(4,)`` xyxy box edges in continuous image coordinates -> centres of the first and last canvas pixels inside."""
    return np.asarray(box, dtype=np.float64) * scale - np.array([0.0, 0.0, 1.0, 1.0])


def legend_entries(views: Sequence[QueryView], color_by: str, caption: str) -> list:
    """Colour swatches for the levels or heads, then what the marks mean."""
    if not views:
        return [(None, caption or "nothing to show")]
    m = views[0].points.shape[0]
    if color_by == "head":
        entries = [(draw.colour(i), f"head {i}") for i in range(m)]
    else:
        entries = [(draw.colour(i), f"level {i} ({h}x{w})") for i, (h, w, _, _) in enumerate(views[0].level_shapes)]
    entries += [(None, "x reference point"), (None, "size+opacity ~ attention weight")]
    if views[0].densities is not None:
        entries.append((None, "strips: count density along the reference row (below) and column (right), per level"))
        entries.append((None, f"and head; black 0, white {density_max(views[0]):.3g}; ticks: sampling points"))
    return entries + ([(None, caption)] if caption else [])


def with_strips(canvas: np.ndarray, view: QueryView, image_size: tuple[int, int], scale: int) -> np.ndarray:
    """Adds the CoPE density strips of ``view``: the rows below the canvas, the columns to its right."""
    height, width = image_size
    rows, cols = [], []
    white = density_max(view)
    for lvl, (row, col) in enumerate(view.densities):
        ticks = view.points[:, lvl, :, :]  # (M, P, 2)
        rows.append(_strip(row / white, width, scale, ticks[..., 0], draw.colour(lvl)))
        cols.append(_strip(col / white, height, scale, ticks[..., 1], draw.colour(lvl)).transpose(1, 0, 2))
    bottom = draw.stack(_spaced(rows, axis=0), axis=0)
    right = draw.stack(_spaced(cols, axis=1), axis=1)
    corner = np.full((bottom.shape[0], right.shape[1], 3), 255, dtype=np.uint8)
    for lvl in range(len(rows)):
        y = lvl * (rows[0].shape[0] + 3) + rows[0].shape[0]
        cv2.putText(corner, f"L{lvl}", (2, y), draw.FONT, 0.35, draw.BLACK, 1, cv2.LINE_AA)
    return draw.stack([draw.stack([canvas, right], axis=1), draw.stack([bottom, corner], axis=1)], axis=0)


def density_max(view: QueryView) -> float:
    """The largest count density of ``view`` (drawn white), at least 1e-12."""
    return max([1e-12] + [float(d.max()) for pair in view.densities or [] for d in pair if d.size])


def _spaced(parts: list[np.ndarray], axis: int, gap: int = 3) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for part in parts:
        if out:
            shape = (gap, part.shape[1], 3) if axis == 0 else (part.shape[0], gap, 3)
            out.append(np.full(shape, 255, dtype=np.uint8))
        out.append(part)
    return out


def _strip(density: np.ndarray, length: int, scale: int, ticks: np.ndarray, tick_colour: draw.Colour) -> np.ndarray:
    """``density (M, valid cells)`` along one image axis of ``length`` pixels -> ``(M * STRIP_ROW, length * scale,
    3)`` grey strip, cell j over image ``[j, j + 1] * length / cells``; ``ticks (M, P)`` image coordinates."""
    m, cells = density.shape
    size = length * scale
    centres = (np.arange(size) + 0.5) / scale  # image coordinate of each strip pixel
    index = np.minimum((centres / length * cells).astype(np.int64), cells - 1)
    grey = np.clip(density[:, index], 0.0, 1.0) * 255
    strip = np.repeat(grey, STRIP_ROW, axis=0).astype(np.uint8)
    strip = cv2.cvtColor(strip, cv2.COLOR_GRAY2BGR)
    for head in range(m):
        for t in ticks[head]:
            x = int(np.floor(t * scale))
            if 0 <= x < size:
                strip[head * STRIP_ROW : (head + 1) * STRIP_ROW, max(x - 1, 0) : x + 1] = tick_colour
    return strip
