"""An exponential moving average of the detector's weights (``train.ema_decay``), evaluated and saved in place of
the weights the optimiser moves.

On a small data set the last steps' noise moves validation AP by several points from one evaluation to the next;
the average of the recent weights is the steadier model (Polyak averaging, as RT-DETR, D-FINE, RF-DETR and
Ultralytics evaluate and ship). The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the
average follows the early, fast-moving weights closely and spans about the last tenth of a short run.

The average is a :class:`torch.optim.swa_utils.AveragedModel` of the detector (parameters and floating buffers);
under DDP every process keeps its own, identical one. A checkpoint of an EMA run holds the average as ``model`` (what
evaluation, inference and export load) and the optimiser's weights as ``training_weights`` with the update count as
``ema_updates`` (what resuming reads).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

WARMUP = 10  # the ramp's constant: the decay is (1 + n) / (WARMUP + n) until it reaches the configured one


def _ema_update(decay: float):
    """``multi_avg_fn`` for :class:`AveragedModel`: ``average <- average + (1 - d) (current - average)``."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (WARMUP + n))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers are counts, not weights: take the current ones
            torch._foreach_copy_(averaged, current)

    return update


def check_ema_decay(decay: float) -> None:
    """Raises ValueError naming ``train.ema_decay`` when ``decay`` is outside [0, 1)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1) (0: no average), got {decay}")


def build_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """The running average of ``model`` for ``train.ema_decay`` (0: none).

    Raises:
        ValueError: a decay outside [0, 1).
    """
    check_ema_decay(decay)
    if decay == 0.0:
        return None
    ema = AveragedModel(model, multi_avg_fn=_ema_update(decay), use_buffers=True)
    return ema.eval().requires_grad_(False)


def ema_updates(ema: AveragedModel) -> int:
    """How many optimiser steps the average has taken in."""
    return int(ema.n_averaged)


def restore_ema(ema: AveragedModel, state: dict[str, torch.Tensor], updates: int) -> None:
    """Sets the average to the detector weights ``state`` after ``updates`` steps (resuming)."""
    ema.module.load_state_dict(state, strict=True)
    ema.n_averaged.fill_(updates)
