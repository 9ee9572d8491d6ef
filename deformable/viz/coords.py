"""From the model's normalised coordinates to original image pixels, and back.

Frames. A sampling location ``(x, y)`` of level l is normalised over that level's feature map ``(H_l, W_l)``,
which covers the whole padded batch image (``x * W_l`` is the edge coordinate on the map, as ``grid_sample`` with
``align_corners=False`` reads it). The image itself is the unpadded part: its valid ratio ``v_l = (valid W_l / W_l,
valid H_l / H_l)``, the fraction the model derives from the padding mask. The model's boxes and reference points
are relative to that valid part, and the valid part is the resized image, which is the original image scaled. So
``x_image = x / v_l,x * W_original`` (likewise y), in continuous pixel coordinates where pixel j spans ``[j, j + 1]``.
Without padding ``v_l = 1`` and this is ``x * W_original``.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def level_to_image(points: torch.Tensor, valid_ratio: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """Normalised level coordinates -> original image pixels.

    Args:
        points: ``(..., 2)`` ``(x, y)`` normalised over a level's padded map.
        valid_ratio: ``(..., 2)`` ``(w, h)`` valid fraction of that level, broadcastable to ``points``.
        image_size: original ``(height, width)``.

    Returns:
        ``(..., 2)`` float64 ``(x, y)`` continuous pixel coordinates (pixel j spans ``[j, j + 1]``).
    """
    height, width = image_size
    size = torch.tensor([width, height], dtype=torch.float64)
    xy = points.detach().cpu().double() / valid_ratio.detach().cpu().double() * size
    return xy.numpy()


def image_to_canvas(xy: np.ndarray, scale: float) -> np.ndarray:
    """Continuous image coordinates ``(..., 2)`` -> pixel-centre coordinates of a canvas ``scale`` times larger
    (what OpenCV draws at): ``x * scale - 0.5``."""
    return np.asarray(xy, dtype=np.float64) * scale - 0.5


def query_at_pixel(
    x: float,
    y: float,
    image_size: tuple[int, int],
    spatial_shapes: torch.Tensor,
    valid_ratios: torch.Tensor,
    level: int,
) -> int:
    """Index in the flattened ``S`` positions of the encoder query of ``level`` whose cell holds image pixel
    ``(x, y)`` (continuous coordinates, e.g. ``x + 0.5`` for the centre of pixel column x).

    Args:
        image_size: original ``(height, width)``.
        spatial_shapes: ``(L, 2)`` ``(H_l, W_l)``.
        valid_ratios: ``(L, 2)`` ``(w, h)`` of one image.

    Raises:
        ValueError: the pixel is outside the image or the level does not exist.
    """
    height, width = image_size
    num_levels = spatial_shapes.shape[0]
    if not 0 <= level < num_levels:
        raise ValueError(f"level {level} does not exist: the model has levels 0..{num_levels - 1}")
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    shapes = spatial_shapes.tolist()
    h, w = shapes[level]
    valid_w = max(1, round(float(valid_ratios[level, 0]) * w))
    valid_h = max(1, round(float(valid_ratios[level, 1]) * h))
    col = min(math.floor(x / width * valid_w), valid_w - 1)
    row = min(math.floor(y / height * valid_h), valid_h - 1)
    start = sum(hh * ww for hh, ww in shapes[:level])
    return start + row * w + col
