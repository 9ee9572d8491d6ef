"""The original's optimiser and schedule: AdamW over three parameter groups, StepLR."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.config import TrainConfig


def _matches(name: str, keywords: Sequence[str]) -> bool:
    return any(keyword in name for keyword in keywords)


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    lr_backbone: float,
    lr_linear_proj_mult: float,
    lr_linear_proj_names: Sequence[str],
    lr_backbone_names: Sequence[str],
) -> list[dict[str, Any]]:
    """Trainable parameters split like the original's main.py.

    Groups: the rest at ``lr``; names containing a ``lr_backbone_names`` keyword at ``lr_backbone``; names containing
    a ``lr_linear_proj_names`` keyword (``reference_points``, ``sampling_offsets``) at ``lr * lr_linear_proj_mult``.
    Frozen parameters (``requires_grad=False``) are left out; empty groups are dropped.
    """
    rest, backbone, linear_proj = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _matches(name, lr_backbone_names):
            backbone.append(param)
        elif _matches(name, lr_linear_proj_names):
            linear_proj.append(param)
        else:
            rest.append(param)
    groups = [
        {"params": rest, "lr": lr, "name": "default"},
        {"params": backbone, "lr": lr_backbone, "name": "backbone"},
        {"params": linear_proj, "lr": lr * lr_linear_proj_mult, "name": "linear_proj"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with ``cfg.lr``, ``cfg.lr_backbone``, ``cfg.lr_linear_proj_mult`` and ``cfg.weight_decay``."""
    groups = param_groups(
        model,
        lr=cfg.lr,
        lr_backbone=cfg.lr_backbone,
        lr_linear_proj_mult=cfg.lr_linear_proj_mult,
        lr_linear_proj_names=cfg.lr_linear_proj_names,
        lr_backbone_names=cfg.lr_backbone_names,
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.StepLR:
    """Multiplies every group's learning rate by 0.1 after ``cfg.lr_drop`` epochs (stepped once per epoch)."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_drop, gamma=0.1)
