"""Building a detector for inference: device, weights (``weights_only=True``), class names, one batched call."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models import build_detector, load_checkpoint
from models.checkpoint import read_checkpoint_file
from models.config import Config, ConfigError, config_from_dict
from training.data import annotation_file
from training.shapes import CATEGORIES as SHAPES_CATEGORIES

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; asking for CUDA without one is an error."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def read_checkpoint(path: str) -> dict[str, Any]:
    """Any dict with a ``model`` entry (ours, or the original's with its ``argparse.Namespace`` args), read on the
    CPU with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, or no ``model`` entry (the file named).
    """
    state = read_checkpoint_file(path)
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise ValueError(f"checkpoint {path} holds no 'model' state dict")
    return dict(state)


def load_detector(cfg: Config, checkpoint: str | None, device: torch.device) -> tuple[nn.Module, dict | None]:
    """The detector of ``cfg.model`` in eval mode on ``device``, with the weights of ``checkpoint``.

    Without a checkpoint the weights are random (a warning says so): useful to debug the tools only. The
    backbone is never downloaded: the checkpoint holds it.

    Returns:
        ``(model, checkpoint dict or None)``.
    """
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_backbone=False))
    model = build_detector(cfg)
    state = None
    if checkpoint is None:
        warnings.warn("no checkpoint given: the detector is randomly initialised (debugging only)", stacklevel=2)
    else:
        state = read_checkpoint(checkpoint)
        try:
            load_checkpoint(model, state)
        except ValueError as exc:
            raise ValueError(f"checkpoint {checkpoint}: {exc}") from exc
    return model.eval().to(device), state


def _categories(cfg: Config) -> dict[int, str]:
    """Category id -> name from the data set of ``cfg.data`` (annotation file, or the synthetic shapes' list)."""
    data = cfg.data
    for split in (data.val_split, data.train_split):
        path = annotation_file(data.root, split)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return {int(c["id"]): str(c["name"]) for c in json.load(f).get("categories", [])}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # an unreadable annotation file only costs the names
    if data.synthetic == "shapes":
        return {i + 1: name for i, name in enumerate(SHAPES_CATEGORIES)}
    return {}


def class_names(cfg: Config, checkpoint: Mapping | None = None) -> dict[int, str]:
    """Category id -> name: from the checkpoint's saved config when it has one, else ``cfg``; empty when neither
    data set can be found (callers then show numeric ids)."""
    saved = checkpoint.get("config") if checkpoint is not None else None
    if isinstance(saved, Mapping):
        try:
            names = _categories(config_from_dict(saved))
        except ConfigError:
            names = {}
        if names:
            return names
    return _categories(cfg)


@torch.no_grad()
def detect(
    model: nn.Module, postprocessor: nn.Module, images: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor
) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """One batch: ``images (B, 3, H, W)``, ``mask (B, H, W)`` and original ``sizes (B, 2)`` as ``(h, w)``.

    Returns:
        ``(outputs, results)``: the model's outputs and, per image, ``scores (k,)``, ``labels (k,)`` and
        ``boxes (k, 4)`` xyxy in original image pixels (on the CPU).
    """
    device = next(model.parameters()).device
    outputs = model(images.to(device), mask.to(device))
    results = postprocessor(outputs, sizes.to(device))
    return outputs, [{k: v.cpu() for k, v in r.items()} for r in results]
