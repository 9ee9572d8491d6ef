"""Image sizes derived from the data (``data.image_size: auto``), so that one recipe fits data sets of other sizes.

The short side S at which images are trained and evaluated is chosen from the training split alone:

- large enough that a small box of the data (the 10th percentile of box side / image side, sides as geometric
  means) spans ``MIN_BOX_PX`` pixels, so that it covers a few cells of the finest feature map (stride 8);
- no larger than the median short side of the images (upsampling adds no detail), nor than
  ``data.max_image_size`` (the compute budget);
- no smaller than ``data.min_image_size``; rounded to a multiple of 32.

From S follow the original's relations (``data.image_size: N`` sets S directly): training short sides from 0.75 S to
S in steps of 32, long sides at most 5/3 S (800 -> 1333 in the original), the random crop's scales and sizes
scaled from the original's 800-px values, and S itself for evaluation and inference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from models.config import Config, ConfigError, DataConfig

MIN_BOX_PX = 32  # a small box spans this many pixels: 4 cells of the stride-8 map
STEP = 32
MAX_TO_SHORT = 1333 / 800  # the original's long-side cap over its short side
SMALL_BOX_QUANTILE = 0.1


def _round(value: float) -> int:
    return max(STEP, int(round(value / STEP)) * STEP)


def box_and_image_sides(coco: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(box side / image side per box, short side per image)`` of a COCO dict; sides are geometric means
    ``sqrt(w * h)`` (crowd and difficult boxes included: they are objects of the data too)."""
    images = {info["id"]: info for info in coco["images"]}
    relative = [
        math.sqrt(a["bbox"][2] * a["bbox"][3] / (images[a["image_id"]]["width"] * images[a["image_id"]]["height"]))
        for a in coco["annotations"]
    ]
    short = [min(info["width"], info["height"]) for info in coco["images"]]
    return np.asarray(relative, dtype=np.float64), np.asarray(short, dtype=np.float64)


def auto_image_size(coco: Mapping[str, Any], min_size: int, max_size: int) -> int:
    """The short side S for a training split's COCO dict (module docstring)."""
    relative, short = box_and_image_sides(coco)
    if not len(short):
        return _round(min_size)
    wanted = MIN_BOX_PX / float(np.quantile(relative, SMALL_BOX_QUANTILE)) if len(relative) else min_size
    up, down = math.ceil(wanted / STEP) * STEP, math.floor(float(np.median(short)) / STEP) * STEP
    return _round(min(max(min(up, down), min_size), max_size))


def sizes_for(size: int) -> dict[str, Any]:
    """The ``data`` values for short side ``size``: training scales, long-side caps, crop, evaluation size."""
    low = _round(0.75 * size)
    scales = list(range(low, size + 1, STEP)) if low < size else [size]
    scale = size / 800  # the crop values are the original's for 800 px
    return {
        "train_scales": scales,
        "train_max_size": int(round(size * MAX_TO_SHORT)),
        "crop_scales": sorted({_round(v * scale) for v in (400, 500, 600)}),
        "crop_size": [_round(384 * scale), _round(600 * scale)],
        "val_size": size,
        "val_max_size": int(round(size * MAX_TO_SHORT)),
    }


def resolve_image_size(cfg: Config, train_coco: Mapping[str, Any] | None = None) -> tuple[Config, str]:
    """``cfg`` with ``data.image_size`` (``auto`` or a short side) turned into the sizes it implies, and a line that
    says what was chosen and why (empty when ``data.image_size`` is 0: the sizes are used as configured).

    ``train_coco`` is the training split's COCO dict; read from ``cfg.data`` when not given (annotations only).
    """
    data: DataConfig = cfg.data
    value = data.image_size
    if value == 0:
        return cfg, ""
    if value == "auto":
        if train_coco is None:
            from .layouts import read_split  # the readers; imported here to keep this module light

            train_coco = read_split(data, "train").coco
        size = auto_image_size(train_coco, data.min_image_size, data.max_image_size)
        relative, short = box_and_image_sides(train_coco)
        why = (
            f"data.image_size=auto -> {size} px (small boxes are {np.quantile(relative, SMALL_BOX_QUANTILE):.2f} of "
            f"the image side, median image short side {np.median(short):.0f} px, limits "
            f"{data.min_image_size}-{data.max_image_size}; override with data.image_size=N)"
            if len(relative)
            else f"data.image_size=auto -> {size} px (no boxes in the training split)"
        )
    elif isinstance(value, int) and value >= STEP:
        size, why = _round(value), f"data.image_size={value} -> short side {_round(value)} px"
    else:
        raise ConfigError(f"config key 'data.image_size' must be 0, 'auto' or a short side >= {STEP}, got {value!r}")
    resolved = dataclasses.replace(data, image_size=0, **sizes_for(size))
    return dataclasses.replace(cfg, data=resolved), why
