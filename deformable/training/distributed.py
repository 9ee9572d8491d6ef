"""Process-group setup under ``torchrun`` and the few collectives the loop needs.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; without them everything runs
as a single process and the collectives are no-ops. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from models.device import resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Joins the process group that ``torchrun`` describes in the environment (if any) and picks the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, option="train.device", distributed=world_size > 1)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce_mean(values: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Averages a dict of floats over processes. A key that some processes lack counts 0 there: an epoch's loss term
    that none of a process's steps had (the denoising terms where its batches held no box) adds 0 to its mean, as a
    step without it adds 0 to a single process's mean."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(set().union(*all_gather(sorted(values))))  # the same keys, in one order, on every process
    if not keys:
        return {}
    packed = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    packed /= dist.get_world_size()
    return dict(zip(keys, packed.tolist(), strict=True))


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_from_main(error: BaseException | None) -> None:
    """Raises rank 0's ``error`` (an exception from work only rank 0 does, or None) on every process, so that the
    others stop with the same message rather than at their next collective, on a connection rank 0 closed."""
    error = broadcast(error)
    if error is not None:
        raise error


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return not dist.is_initialized() or dist.get_rank() == 0
