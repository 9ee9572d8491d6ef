"""Choosing the device every tool and the training loop run on."""

from __future__ import annotations

import torch

from .config import DEVICES, ConfigError


def resolve_device(name: str, local_rank: int = 0, option: str = "device") -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when a GPU is visible, else ``cpu``; ``cpu``; ``cuda`` (``cuda:<local_rank>``).

    ``option`` names the setting in error messages (``train.device``, ``--device``).

    Raises:
        ConfigError: an unknown name, or ``cuda`` when torch sees no CUDA device.
    """
    if name not in DEVICES:
        raise ConfigError(f"{option} must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}=cuda but torch sees no CUDA device; use {option}=cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())
