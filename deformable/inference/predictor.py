"""Building a detector for inference: device, weights (``weights_only=True``), class names, one batched call."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import models
from deformable.data import dataset_class_names
from models.checkpoint import Checkpoint
from models.config import Config, ConfigError, config_from_dict


def load_detector(
    cfg: Config, checkpoint: str | Checkpoint | None, device: torch.device
) -> tuple[nn.Module, Checkpoint | None]:
    """The detector of ``cfg.model`` in eval mode on ``device`` with the weights of ``checkpoint`` (any format
    :func:`models.read_checkpoint` reads; it must fit ``cfg.model``, class count included).

    Without a checkpoint the weights are random (a warning says so): useful to debug the tools only. The backbone is
    never downloaded: the checkpoint holds it.
    """
    if checkpoint is None:
        warnings.warn("no checkpoint given: the detector is randomly initialised (debugging only)", stacklevel=2)
    model, checkpoint = models.load_detector(cfg, checkpoint)
    return model.to(device), checkpoint


def _categories(cfg: Config) -> dict[int, str]:
    """Category id -> name from the data set of ``cfg.data`` in any layout (or the synthetic shapes' list)."""
    return dataset_class_names(cfg.data)


def class_names(cfg: Config, checkpoint: Checkpoint | None = None) -> dict[int, str]:
    """Category id -> name: the checkpoint's own names (this project's checkpoints, transformers' ``id2label``, COCO
    for the original's), else those of the data set of its saved config, else of ``cfg``'s; empty when none is
    found (callers then show numeric ids)."""
    if checkpoint is not None and checkpoint.class_names:
        return dict(checkpoint.class_names)
    if checkpoint is not None and checkpoint.config is not None:
        try:
            names = _categories(config_from_dict(checkpoint.config))
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
