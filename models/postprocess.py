"""Turns the detector's outputs into scored, labelled boxes in image pixels (what the COCO API expects)."""

from __future__ import annotations

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .config import Config


class PostProcess(nn.Module):
    """Top-k over all (query, class) pairs of the sigmoid scores, as the original.

    Args:
        num_select: detections kept per image (at most ``Q * num_classes``).
    """

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"num_select must be positive, got {num_select}")
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Selects the detections.

        Args:
            outputs: ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)`` normalised cxcywh.
            target_sizes: ``(B, 2)`` ``(h, w)`` of each image in pixels: the original size for evaluation, the
                size before padding for visualisation.

        Returns:
            B dicts, sorted by descending score: ``scores (k,)``, ``labels (k,)`` int64, ``boxes (k, 4)`` absolute
            ``(x0, y0, x1, y1)``.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        target_sizes = torch.as_tensor(target_sizes, device=logits.device)
        if target_sizes.dim() != 2 or target_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2) rows of (h, w), got {tuple(target_sizes.shape)}"
            )
        b, q, k = logits.shape
        prob = logits.sigmoid()
        scores, index = torch.topk(prob.view(b, -1), min(self.num_select, q * k), dim=1)
        query = torch.div(index, k, rounding_mode="floor")
        labels = index % k
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, query.unsqueeze(-1).expand(-1, -1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)
        boxes = boxes * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, boxes, strict=True)]


def build_postprocessor(cfg: Config) -> PostProcess:
    """``cfg.loss.num_select``."""
    return PostProcess(cfg.loss.num_select)
