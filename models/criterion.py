"""The set criterion: Hungarian matching, then sigmoid focal, L1 and GIoU losses on every decoder layer (and the
two-stage encoder proposals), weighted and summed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy
from .config import Config
from .matcher import HungarianMatcher, build_matcher

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def _matched(indices: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Matches -> ``(batch_index, query_index)`` of every matched prediction."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def average_num_boxes(targets: list[dict], device: torch.device) -> float:
    """Targets per process, averaged over the distributed processes when initialised, at least 1."""
    num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num_boxes)
        world_size = dist.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1).item()


class SetCriterion(nn.Module):
    """Deformable DETR's loss.

    For each set of predictions (final, ``aux_outputs`` i -> suffix ``_i``, ``enc_outputs`` -> ``_enc`` matched
    against class-agnostic targets) it matches predictions to targets and computes
    - ``loss_ce``: sigmoid focal loss summed over queries and classes / num_boxes;
    - ``loss_bbox``: L1 of matched normalised cxcywh boxes / num_boxes;
    - ``loss_giou``: (1 - GIoU) of matched boxes / num_boxes,
    where num_boxes is the number of targets averaged over processes.

    Args:
        num_classes: class logits per prediction.
        matcher: the Hungarian matcher.
        weight_dict: weight of each base loss name (``loss_ce``, ``loss_bbox``, ``loss_giou``).
        focal_alpha: alpha of the focal loss (gamma is 2).
    """

    def __init__(
        self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float], focal_alpha: float = 0.25
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_boxes: float) -> torch.Tensor:
        """Sigmoid focal loss against one-hot targets (unmatched predictions: all zeros)."""
        logits = outputs["pred_logits"]  # (B, Q, K)
        batch_idx, query_idx = (i.to(logits.device) for i in _matched(indices))
        onehot = torch.zeros_like(logits)
        classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(logits.device)
        onehot[batch_idx, query_idx, classes] = 1.0
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=2.0, reduction="none")
        # The original's normalisation: mean over queries, sum, / num_boxes, * Q.
        return loss.mean(1).sum() / num_boxes * logits.shape[1]

    def loss_boxes(
        self, outputs: dict, targets: list[dict], indices: list, num_boxes: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L1 and (1 - GIoU) of the matched boxes, each summed / num_boxes."""
        src_boxes = outputs["pred_boxes"][_matched(indices)]
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return loss_bbox, loss_giou

    def _losses(self, outputs: dict, targets: list[dict], num_boxes: float, suffix: str) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        loss_ce = self.loss_labels(outputs, targets, indices, num_boxes)
        loss_bbox, loss_giou = self.loss_boxes(outputs, targets, indices, num_boxes)
        raw = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return {name + suffix: value * self.weight_dict[name] for name, value in raw.items()}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Computes the weighted losses.

        Args:
            outputs: the detector's output dict (``pred_logits``, ``pred_boxes``, optional ``aux_outputs`` and
                ``enc_outputs``).
            targets: one dict per image with ``labels (n,)`` int64 and ``boxes (n, 4)`` normalised cxcywh.

        Returns:
            ``loss_ce``, ``loss_bbox``, ``loss_giou``, the same with ``_0`` .. ``_{dec_layers-2}`` for the auxiliary
            outputs and ``_enc`` for the two-stage proposals, each multiplied by its weight, and ``loss``, their sum.
        """
        _check_targets(targets, outputs["pred_logits"].shape[0], self.num_classes)
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self._losses(outputs, targets, num_boxes, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses(aux, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses(outputs["enc_outputs"], binary_targets, num_boxes, "_enc"))
        losses["loss"] = sum(losses.values())
        return losses


def _check_targets(targets: list[dict], batch_size: int, num_classes: int) -> None:
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        raise ValueError(f"targets must be a list of {batch_size} dicts (one per image)")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{i}] must have 'labels' and 'boxes', got keys {sorted(t)}")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels'] must be (n,) int64, got {tuple(labels.shape)} {labels.dtype}")
        if boxes.shape != (labels.shape[0], 4):
            raise ValueError(f"targets[{i}]['boxes'] must be ({labels.shape[0]}, 4), got {tuple(boxes.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] must be in [0, {num_classes}), got {labels.tolist()}")


def build_criterion(cfg: Config) -> SetCriterion:
    """``cfg.loss``: matcher costs, cls/bbox/giou_loss_coef, focal_alpha; ``cfg.model.num_classes``."""
    weight_dict = {
        "loss_ce": cfg.loss.cls_loss_coef,
        "loss_bbox": cfg.loss.bbox_loss_coef,
        "loss_giou": cfg.loss.giou_loss_coef,
    }
    return SetCriterion(cfg.model.num_classes, build_matcher(cfg), weight_dict, focal_alpha=cfg.loss.focal_alpha)
