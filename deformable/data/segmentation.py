"""Boxes from COCO segmentations: what exporters that write masks but leave ``bbox`` empty (CVAT, Label Studio) need
read as boxes."""

from __future__ import annotations

import math
from typing import Any

from pycocotools import mask as mask_utils


def is_number(value: Any) -> bool:
    """A JSON number (not a bool, which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def box_from_segmentation(segmentation: Any) -> list[float] | None:
    """``[x, y, w, h]`` enclosing a COCO ``segmentation``: polygons ``[[x1, y1, x2, y2, ...], ...]`` (their min and
    max, continuous coordinates, as COCO's own boxes are) or RLE ``{"size": [h, w], "counts": [...] | "..."}``
    (pycocotools' ``toBbox``); None when it is neither."""
    if isinstance(segmentation, dict):
        return _rle_box(segmentation)
    polygons = segmentation if isinstance(segmentation, list) else []
    even = all(isinstance(p, list) and p and len(p) % 2 == 0 for p in polygons)
    if not polygons or not even or not all(is_number(v) and math.isfinite(v) for p in polygons for v in p):
        return None
    xs, ys = [x for p in polygons for x in p[0::2]], [y for p in polygons for y in p[1::2]]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _rle_box(rle: dict[str, Any]) -> list[float] | None:
    """The box of an RLE mask, uncompressed (``counts`` a list of run lengths) or compressed (a string); None when
    its size is no ``[h, w]`` or its counts do not fill that size."""
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return None
    height, width = size
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
            return None
        rle = mask_utils.frPyObjects(rle, height, width)
    elif not isinstance(counts, str):
        return None
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return [x, y, w, h] if x + w <= width and y + h <= height else None  # a corrupt string decodes past the mask
