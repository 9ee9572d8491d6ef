"""The noise of denoising queries (DN-DETR): labels flipped to another class, boxes shifted and rescaled."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert


def noise_labels(
    labels: torch.Tensor, num_classes: int, rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replaces each label, with probability ``rate``, by a class drawn uniformly among the *other* classes, so that
    ``rate`` is the fraction of labels that change (DN-DETR draws among all classes, which changes a little fewer).

    Args:
        labels: int64 class indices in ``[0, num_classes)``, any shape.
        num_classes: K (with one class nothing can change).
        rate: flip probability in [0, 1].

    Returns:
        int64 tensor of the same shape.
    """
    if rate == 0 or num_classes < 2 or labels.numel() == 0:
        return labels.clone()
    flip = torch.rand(labels.shape, generator=generator, device=labels.device) < rate
    step = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.where(flip, (labels + step) % num_classes, labels)


def noise_boxes(boxes: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shifts each box's centre by up to ``scale * (w / 2, h / 2)`` and scales its width and height by factors in
    ``[1 - scale, 1 + scale]`` (uniformly, independently), then clips its corners to the image.

    Args:
        boxes: ``(..., 4)`` normalised ``(cx, cy, w, h)`` in [0, 1].
        scale: the noise scale in [0, 1] (DN-DETR uses 0.4).

    Returns:
        ``(..., 4)`` normalised cxcywh whose corners lie in [0, 1].
    """
    if boxes.numel() == 0:
        return boxes.clone()
    wh = boxes[..., 2:]
    uniform = torch.rand(boxes.shape, generator=generator, device=boxes.device, dtype=boxes.dtype) * 2 - 1  # [-1, 1)
    centre = boxes[..., :2] + uniform[..., :2] * scale * wh / 2
    size = wh * (1 + uniform[..., 2:] * scale)
    corners = box_convert(torch.cat([centre, size], -1), in_fmt="cxcywh", out_fmt="xyxy").clamp(0.0, 1.0)
    return box_convert(corners, in_fmt="xyxy", out_fmt="cxcywh")
