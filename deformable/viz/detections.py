"""Detections drawn on their image: one colour per class, ``name score`` labels."""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch

from . import draw


def draw_detections(image: np.ndarray, result: Mapping[str, torch.Tensor], names: Mapping[int, str]) -> np.ndarray:
    """``image`` ``(H, W, 3)`` RGB and one post-processed result (``scores (k,)``, ``labels (k,)``, ``boxes (k, 4)``
    xyxy in image pixels) -> BGR image with the boxes, lowest score drawn first."""
    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    scores = result["scores"].tolist()
    for k in np.argsort(scores, kind="stable"):
        label = int(result["labels"][k])
        x0, y0, x1, y1 = result["boxes"][k].tolist()
        box = (x0, y0, x1 - 1, y1 - 1)  # box edges -> centres of the first and last pixels inside
        draw.draw_box(canvas, box, draw.colour(label), f"{names.get(label, str(label))} {scores[k]:.2f}")
    return canvas
