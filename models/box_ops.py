"""Box parametrisation helpers: the inverse sigmoid of the reference points and box format conversion."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with x clamped to [0, 1] and both terms to at least ``eps`` (the original's)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` ``(cx, cy, w, h)`` -> ``(..., 4)`` ``(x0, y0, x1, y1)``."""
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
