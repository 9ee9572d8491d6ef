"""Hungarian matching of predictions to targets with the focal class cost, L1 and GIoU box costs."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from .box_ops import box_cxcywh_to_xyxy
from .config import Config

PREDICTIONS = ("pred_logits", "pred_boxes")  # what the cost is made of


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU)``.

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 distance of the normalised cxcywh boxes.
        cost_giou: weight of the negative generalised IoU.
        focal_alpha: alpha of the focal cost (the original fixes it at 0.25).
        focal_gamma: gamma of the focal cost.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: the costs cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict, targets: list[dict]) -> torch.Tensor:
        """``(B, Q, T)`` cost of every prediction against every target of the batch (T = all targets, concatenated;
        each image's block is what it is matched on)."""
        bs, num_queries = outputs["pred_logits"].shape[:2]
        prob = outputs["pred_logits"].flatten(0, 1).sigmoid()  # (B*Q, K)
        out_bbox = outputs["pred_boxes"].flatten(0, 1)  # (B*Q, 4)
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox.dtype)

        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost[:, tgt_ids] - neg_cost[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.view(bs, num_queries, -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Matches each image's predictions to its targets.

        Args:
            outputs: ``pred_logits (B, Q, K)`` and ``pred_boxes (B, Q, 4)`` normalised cxcywh.
            targets: B dicts with ``labels (n_i,)`` int64 and ``boxes (n_i, 4)`` normalised cxcywh.

        Returns:
            B pairs ``(pred_index, target_index)`` of int64 tensors of length ``min(Q, n_i)``, pred_index ascending.

        Raises:
            FloatingPointError: the cost holds NaN or inf (the predictions have diverged, or a target box is bad); the
                message says which.
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} predictions")
        cost = self.cost_matrix(outputs, targets).cpu()
        if not torch.isfinite(cost).all():  # scipy would refuse the matrix with no word of why
            raise FloatingPointError(_non_finite(outputs, targets))
        sizes = [len(t["boxes"]) for t in targets]
        indices = [linear_sum_assignment(c[i]) for i, c in enumerate(cost.split(sizes, -1))]
        return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def _non_finite(outputs: dict, targets: list[dict]) -> str:
    """Why the cost matrix holds NaN or inf: the predictions (their non-finite values counted), or the targets."""
    found = [(key, int((~torch.isfinite(outputs[key])).sum()), outputs[key].numel()) for key in PREDICTIONS]
    found = [f"{key}: {bad} of {total} values" for key, bad, total in found if bad]
    if found:
        return f"the predictions hold NaN or inf ({', '.join(found)}): Hungarian matching cannot pair them with targets"
    bad = sum(int((~torch.isfinite(t["boxes"])).sum()) for t in targets)
    return (
        f"the matching cost is NaN or inf though the predictions are finite (the target boxes hold {bad} NaN or inf "
        "values; a predicted and a target box both of zero size make GIoU 0/0): Hungarian matching cannot pair them"
    )


def build_matcher(cfg: Config) -> HungarianMatcher:
    """``cfg.loss``: set_cost_class, set_cost_bbox, set_cost_giou, focal_alpha."""
    return HungarianMatcher(
        cost_class=cfg.loss.set_cost_class,
        cost_bbox=cfg.loss.set_cost_bbox,
        cost_giou=cfg.loss.set_cost_giou,
        focal_alpha=cfg.loss.focal_alpha,
    )
