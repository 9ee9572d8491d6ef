"""Everything a run needs before its first step: the output folder, the data, the model (and its weights)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from models import build_detector, load_checkpoint
from models.config import Config, save_config

from . import distributed
from .checkpoint import CheckpointError, read_checkpoint, remove_stale_temp_files
from .data import CocoDataset, build_dataset, build_loader, check_num_classes
from .distributed import DistEnv
from .shapes import ensure_synthetic


def prepare_output_dir(cfg: Config, env: DistEnv) -> None:
    """Rank 0 creates ``output_dir``, clears temporary files of a killed run, generates the synthetic data set if
    asked and writes ``config.yaml``; the other ranks wait for it."""
    if env.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        remove_stale_temp_files(cfg.output_dir)
        ensure_synthetic(cfg.data)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    distributed.barrier()


@dataclass
class Data:
    train_set: CocoDataset | None
    val_set: CocoDataset
    train_loader: DataLoader | None
    val_loader: DataLoader


def build_data(cfg: Config, env: DistEnv, train: bool = True) -> Data:
    """The validation split (and with ``train`` the training split), sharded over ``env``'s processes."""
    args = dict(num_workers=cfg.data.num_workers, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed)
    val_set = build_dataset(cfg.data, "val")
    val_loader = build_loader(val_set, batch_size=cfg.train.batch_size, train=False, **args)
    if not train:
        return Data(None, val_set, None, val_loader)
    train_set = build_dataset(cfg.data, "train")
    check_num_classes(train_set, cfg.model.num_classes)
    train_loader = build_loader(train_set, batch_size=cfg.train.batch_size, train=True, **args)
    return Data(train_set, val_set, train_loader, val_loader)


def build_model(cfg: Config, device: torch.device, from_checkpoint: bool) -> nn.Module:
    """The detector on ``device``; no pretrained download when a checkpoint will overwrite the weights anyway."""
    if from_checkpoint:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_backbone=False))
    return build_detector(cfg).to(device)


def finetune_from(model: nn.Module, path: str) -> None:
    """``train.finetune``: loads ``path``'s weights; class heads of another class count are re-initialised."""
    try:
        load_checkpoint(model, read_checkpoint(path))
    except ValueError as exc:
        raise CheckpointError(f"train.finetune={path}: {exc}") from exc
