"""Shared helpers of the tests/test_models_*.py files (small configs, targets)."""

from __future__ import annotations

import torch

from models import load_config
from models.config import Config

# A small but complete detector: resnet18, 64 channels, 2+3 layers, 20 queries, 5 classes.
TINY = [
    "model.backbone=resnet18",
    "model.pretrained_backbone=false",
    "model.hidden_dim=64",
    "model.dim_feedforward=128",
    "model.enc_layers=2",
    "model.dec_layers=3",
    "model.num_queries=20",
    "model.num_classes=5",
]
VARIANTS = {
    "single_scale": ["model.num_feature_levels=1"],
    "multi_scale": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
}


def tiny_config(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def sample_targets() -> list[dict]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])},
    ]


def padded_batch(height: int = 96, width: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images, the second padded at the right and bottom (zeros under its mask)."""
    images = torch.randn(2, 3, height, width)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[1, height * 2 // 3 :, :] = True
    mask[1, :, width * 3 // 4 :] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def perturb(model: torch.nn.Module, scale: float = 0.02) -> None:
    """Adds noise to every trainable parameter (the zero-initialised ones would otherwise block gradients)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
