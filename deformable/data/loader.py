"""Batching: padding collation, the (distributed) loader and its per-epoch seeding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .errors import DatasetError


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Pads images bottom/right to the largest H and W in the batch.

    Returns ``images`` (B, 3, H, W) zero-padded, ``mask`` (B, H, W) bool with True = padding, and the targets.
    """
    images = [image for image, _ in batch]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    padded = images[0].new_zeros((len(images), 3, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        padded[i, :, :h, :w] = image
        mask[i, :h, :w] = False
    return padded, mask, [target for _, target in batch]


class ShardedBatches(Sampler[list[int]]):
    """The batches of one process's validation shard: the single-process batches in order (images ``0..B-1``,
    ``B..2B-1``, ...), batch ``i`` on rank ``i % world_size``. Each image is then padded together with the same
    images whatever the number of processes (padding moves detections slightly), so metrics do not depend on it;
    every image is read once."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int) -> None:
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size

    def _starts(self) -> range:
        return range(self.rank * self.batch_size, self.size, self.world_size * self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in self._starts():
            yield list(range(start, min(start + self.batch_size, self.size)))

    def __len__(self) -> int:
        return len(self._starts())


def build_loader(
    dataset: Dataset, *, batch_size: int, train: bool, num_workers: int, rank: int, world_size: int, seed: int
) -> DataLoader:
    """Shards ``dataset`` over ``world_size`` processes; training shuffles (per epoch, see :func:`set_epoch`) and
    drops the last incomplete batch, validation keeps every image in the single-process batches
    (:class:`ShardedBatches`)."""
    if not train:
        batches = ShardedBatches(len(dataset), batch_size, rank, world_size)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    if len(sampler) < batch_size:
        raise DatasetError(
            f"the training split has {len(dataset)} images, fewer than train.batch_size={batch_size} per process "
            f"x {world_size} process(es); lower train.batch_size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator(),
    )


def set_epoch(loader: DataLoader, epoch: int, seed: int, rank: int) -> None:
    """Makes the shuffle and the worker augmentation seeds a function of (seed, epoch, rank), so a resumed run
    replays the epochs it would have run."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed + 1000 * epoch + rank)
