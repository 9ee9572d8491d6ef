"""The set criterion: Hungarian matching, then sigmoid focal (or varifocal), L1 and GIoU losses on every decoder
layer (and the two-stage encoder proposals, and the training-only extra queries), weighted and summed."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy
from .config import Config
from .matcher import HungarianMatcher, build_matcher
from .training_queries import ExtraLayout


def _matched(indices: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Matches -> ``(batch_index, query_index)`` of every matched prediction."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def varifocal_loss(logits: torch.Tensor, score: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Varifocal loss (VarifocalNet, Zhang et al. 2021), elementwise.

    ``score`` is the soft target: the IoU of a matched prediction's box at its class, 0 elsewhere. Positives
    (``score > 0``) get the binary cross-entropy against ``score`` weighted by ``score``; negatives get
    ``-alpha * p**gamma * log(1 - p)``, the focal loss of a negative when ``alpha = 1 - focal_alpha``.

    Args:
        logits: ``(..., K)`` class logits.
        score: ``(..., K)`` targets in [0, 1] (no gradient).

    Returns:
        ``(..., K)`` loss.
    """
    prob = logits.sigmoid()
    weight = torch.where(score > 0, score, alpha * prob.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, score, reduction="none") * weight


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
    - ``loss_ce``: sigmoid focal loss (varifocal with ``iou_aware``) summed over queries and classes / num_boxes;
    - ``loss_bbox``: L1 of matched normalised cxcywh boxes / num_boxes;
    - ``loss_giou``: (1 - GIoU) of matched boxes / num_boxes,
    where num_boxes is the number of targets averaged over processes. Training-only extra queries
    (``extra_outputs``, see :mod:`models.training_queries`) add, per decoder layer (suffix ``_i`` but the last):
    ``_dn`` for the denoising queries, each compared with the target it is a noised copy of (no matching), over
    num_boxes * dn_groups; ``_g{k}`` for one-to-many group k (1-based), matched on its own.

    Args:
        num_classes: class logits per prediction.
        matcher: the Hungarian matcher.
        weight_dict: weight of each base loss name (``loss_ce``, ``loss_bbox``, ``loss_giou``).
        focal_alpha: alpha of the focal loss (gamma is 2).
        iou_aware: varifocal classification: a matched prediction's target is its box's IoU with its target
            (detached) instead of 1; negatives weighted ``(1 - focal_alpha) * p**2`` as in the focal loss.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        iou_aware: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.iou_aware = iou_aware

    def loss_labels(self, outputs: dict, targets: list[dict], indices: list, num_boxes: float) -> torch.Tensor:
        """Sigmoid focal loss against one-hot targets (unmatched predictions: all zeros), or varifocal."""
        logits = outputs["pred_logits"]  # (B, Q, K)
        loss = self._class_loss(outputs, targets, indices)
        # The original's normalisation: mean over queries, sum, / num_boxes, * Q.
        return loss.mean(1).sum() / num_boxes * logits.shape[1]

    def _class_loss(self, outputs: dict, targets: list[dict], indices: list) -> torch.Tensor:
        """``(B, Q, K)`` elementwise focal loss against one-hot targets, or varifocal against IoU targets."""
        logits = outputs["pred_logits"]  # (B, Q, K)
        batch_idx, query_idx = (i.to(logits.device) for i in _matched(indices))
        onehot = torch.zeros_like(logits)
        classes = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(logits.device)
        if not self.iou_aware:
            onehot[batch_idx, query_idx, classes] = 1.0
            return sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=2.0, reduction="none")
        src_boxes = outputs["pred_boxes"][batch_idx, query_idx].detach()
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)]).to(src_boxes)
        iou = torch.diag(box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes)))
        onehot[batch_idx, query_idx, classes] = iou.clamp(min=0).to(onehot.dtype)
        return varifocal_loss(logits, onehot, alpha=1 - self.focal_alpha, gamma=2.0)

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

    def _denoising_losses(
        self, outputs: dict, targets: list[dict], layout: ExtraLayout, num_boxes: float, suffix: str
    ) -> dict[str, torch.Tensor]:
        """Losses of the denoising slots ``outputs`` (``(B, dn_groups * dn_slots, ...)``): each valid slot against
        the target it copies, padded slots left out, normalised by num_boxes * dn_groups (one copy's worth)."""
        counts = [len(t["labels"]) for t in targets]
        indices = layout.dn_indices(counts)
        norm = num_boxes * layout.dn_groups
        valid = layout.dn_valid(counts, outputs["pred_logits"].device)
        loss_ce = (self._class_loss(outputs, targets, indices) * valid[..., None]).sum() / norm
        loss_bbox, loss_giou = self.loss_boxes(outputs, targets, indices, norm)
        raw = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return {name + suffix: value * self.weight_dict[name] for name, value in raw.items()}

    def _extra_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, torch.Tensor]:
        """``_dn`` and ``_g{k}`` losses of every layer of ``outputs["extra_outputs"]`` (see the class docstring)."""
        if "extra_layout" not in outputs:
            raise ValueError("outputs has 'extra_outputs' but no 'extra_layout' saying which extra query is which")
        layout: ExtraLayout = outputs["extra_layout"]
        layers = outputs["extra_outputs"]
        losses: dict[str, torch.Tensor] = {}
        for i, out in enumerate(layers):
            layer = "" if i == len(layers) - 1 else f"_{i}"
            if layout.num_dn > 0:
                dn = {k: v[:, : layout.num_dn] for k, v in out.items()}
                losses.update(self._denoising_losses(dn, targets, layout, num_boxes, f"_dn{layer}"))
            for k in range(layout.query_groups):
                group = {key: v[:, layout.group_slice(k)] for key, v in out.items()}
                losses.update(self._losses(group, targets, num_boxes, f"_g{k + 1}{layer}"))
        return losses

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Computes the weighted losses.

        Args:
            outputs: the detector's output dict (``pred_logits``, ``pred_boxes``, optional ``aux_outputs``,
                ``enc_outputs``, and ``extra_outputs`` with ``extra_layout``).
            targets: one dict per image with ``labels (n,)`` int64 and ``boxes (n, 4)`` normalised cxcywh.

        Returns:
            ``loss_ce``, ``loss_bbox``, ``loss_giou``, the same with ``_0`` .. ``_{dec_layers-2}`` for the auxiliary
            outputs, ``_enc`` for the two-stage proposals, ``_dn[_i]`` and ``_g{k}[_i]`` for the extra queries, each
            multiplied by its weight, and ``loss``, their sum.
        """
        _check_targets(targets, outputs["pred_logits"].shape[0], self.num_classes)
        num_boxes = average_num_boxes(targets, outputs["pred_logits"].device)
        losses = self._losses(outputs, targets, num_boxes, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses(aux, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            binary_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._losses(outputs["enc_outputs"], binary_targets, num_boxes, "_enc"))
        if "extra_outputs" in outputs:
            losses.update(self._extra_losses(outputs, targets, num_boxes))
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
    """``cfg.loss``: matcher costs, cls/bbox/giou_loss_coef, focal_alpha, iou_aware; ``cfg.model.num_classes``."""
    weight_dict = {
        "loss_ce": cfg.loss.cls_loss_coef,
        "loss_bbox": cfg.loss.bbox_loss_coef,
        "loss_giou": cfg.loss.giou_loss_coef,
    }
    return SetCriterion(
        cfg.model.num_classes,
        build_matcher(cfg),
        weight_dict,
        focal_alpha=cfg.loss.focal_alpha,
        iou_aware=cfg.loss.iou_aware,
    )
