"""Choosing the device every tool and the training loop run on."""

from __future__ import annotations

import torch

from .config import DEVICES, ConfigError, is_device_name


def resolve_device(
    name: str | torch.device, local_rank: int = 0, option: str = "device", distributed: bool = False
) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when a GPU is visible, else ``cpu``; ``cpu``; ``cuda`` (``cuda:<local_rank>``);
    ``cuda:<index>`` that GPU (not under ``torchrun``, where each process takes its local rank's). A ``torch.device``
    is taken by its name.

    ``option`` names the setting in error messages (``train.device``, ``--device``).

    Raises:
        ConfigError: an unknown name, ``cuda`` when torch sees no CUDA device, an index past the GPUs it sees, or an
            index with ``distributed``.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not is_device_name(name):
        raise ConfigError(f"{option} must be one of {', '.join(DEVICES)} or cuda:<index>, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name} but torch sees no CUDA device; use {option}=cpu or auto")
    if name.startswith("cuda:"):
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{option}={name} but torch sees {torch.cuda.device_count()} CUDA device(s) (indices from 0; "
                "CUDA_VISIBLE_DEVICES renumbers them)"
            )
        if distributed:
            raise ConfigError(
                f"{option}={name} under torchrun: each process takes the GPU of its local rank; use {option}=cuda "
                "and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", index)
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())
