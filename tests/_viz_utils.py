"""Shared by tests/test_viz_*.py and tests/test_infer.py: a tiny detector config, small images on disk."""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from models import build_detector, load_config
from models.config import Config, config_to_dict

# resnet18, 32 channels, 2 levels, 1 encoder + 2 decoder layers, 5 queries; images resized to 64 (longest <= 96).
TINY = [
    "model.backbone=resnet18",
    "model.pretrained_backbone=false",
    "model.hidden_dim=32",
    "model.dim_feedforward=64",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.nheads=2",
    "model.num_queries=5",
    "model.num_classes=4",
    "model.num_feature_levels=2",
    "data.val_size=64",
    "data.val_max_size=96",
    "data.root=/nonexistent/data",
]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def tiny_model(*overrides: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_detector(tiny_config(*overrides)).eval()


def shapes_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB: noise with a filled rectangle and a disc."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    cv2.rectangle(image, (width // 8, height // 6), (width // 2, height // 2), (220, 40, 40), -1)
    cv2.circle(image, (3 * width // 4, 2 * height // 3), min(height, width) // 6, (40, 80, 220), -1)
    return image


def write_image(path: str, image: np.ndarray) -> str:
    assert cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


def write_checkpoint(path: str, model: torch.nn.Module, cfg: Config | None = None) -> str:
    state = {"model": model.state_dict(), "epoch": 0}
    if cfg is not None:
        state["config"] = config_to_dict(cfg)
    torch.save(state, path)
    return path


def tool_argv_config(tmp_path) -> list[str]:
    """``CONFIG`` plus overrides for a tool's command line: a YAML file with no keys, then :data:`TINY`."""
    path = os.path.join(str(tmp_path), "empty.yaml")
    with open(path, "w") as f:
        f.write("{}\n")
    return [path, *TINY]
