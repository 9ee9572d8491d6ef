"""Everything a run needs before its first step: the output folder, the data, the model (and its weights)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from deformable.data import (
    DetectionDataset,
    align_to_checkpoint,
    build_dataset,
    build_loader,
    check_has_boxes,
    check_num_classes,
    classes_without_training_boxes,
    ensure_synthetic,
    summarise,
)
from deformable.data.sizes import resolve_image_size
from models import build_detector, load_checkpoint, read_checkpoint
from models.checkpoint import CheckpointError
from models.config import Config, save_config
from models.files import make_dir, remove_stale_temp_files
from models.loading import check_architecture
from models.training_queries import TrainingDetector, build_query_aids

from . import distributed
from .distributed import DistEnv


def prepare_output_dir(cfg: Config, env: DistEnv) -> None:
    """Rank 0 creates ``output_dir``, clears temporary files of a killed run and generates the synthetic data set
    if asked (only into a folder it generated itself); the other ranks wait for it."""
    if env.is_main:
        make_dir(cfg.output_dir, "output_dir")
        remove_stale_temp_files(cfg.output_dir)
        ensure_synthetic(cfg.data)
    distributed.barrier()


def resolve_data_options(cfg: Config, env: DistEnv) -> Config:
    """``data.image_size`` resolved from the training split (every rank alike); rank 0 prints the choice."""
    cfg, why = resolve_image_size(cfg)
    if why and env.is_main:
        print(why, flush=True)
    return cfg


def save_resolved_config(cfg: Config, env: DistEnv) -> None:
    """Rank 0 writes ``output_dir/config.yaml``: the config as run, every ``auto`` resolved."""
    if env.is_main:
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))


@dataclass
class Data:
    train_set: DetectionDataset | None
    val_set: DetectionDataset
    train_loader: DataLoader | None
    val_loader: DataLoader


def build_data(cfg: Config, env: DistEnv, train: bool = True, checkpoint_names: dict[int, str] | None = None) -> Data:
    """The validation split (and with ``train`` the training split) of any layout, sharded over ``env``'s
    processes; rank 0 prints one summary line per split, with a warning when an image holds more objects than
    ``model.num_queries`` and one per class with validation boxes and no training box. With ``checkpoint_names``
    (a checkpoint's category id -> name, for evaluating it) the validation split's ids are renumbered to the
    checkpoint's by name (:func:`~deformable.data.categories.align_to_checkpoint`), and rank 0 says how."""
    args = dict(num_workers=cfg.data.num_workers, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed)
    val_set = build_dataset(cfg.data, "val")
    notes = align_to_checkpoint(val_set, checkpoint_names or {})
    val_loader = build_loader(val_set, batch_size=cfg.train.batch_size, train=False, **args)
    train_set, train_loader = None, None
    if train:
        train_set = build_dataset(cfg.data, "train")
        check_has_boxes(train_set)
        check_num_classes(train_set, cfg.model.num_classes)
        notes += classes_without_training_boxes(train_set, val_set)
        train_loader = build_loader(train_set, batch_size=cfg.train.batch_size, train=True, **args)
    if env.is_main:
        for dataset in (train_set, val_set):
            if dataset is not None:
                print(summarise(dataset, cfg.model.num_queries), flush=True)
        for note in notes:
            print(note, flush=True)
    return Data(train_set, val_set, train_loader, val_loader)


def build_model(cfg: Config, device: torch.device, from_checkpoint: bool) -> nn.Module:
    """The detector on ``device``; no pretrained download when a checkpoint will overwrite the weights anyway."""
    if from_checkpoint:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_backbone=False))
    return build_detector(cfg).to(device)


def build_trainee(cfg: Config, detector: nn.Module) -> TrainingDetector:
    """What the loop trains: the detector with its training-only query aids (``cfg.training_queries``; none when
    every option is off, and the trainee is the detector alone), the aids on the detector's device."""
    aids = build_query_aids(cfg)
    if aids is not None:
        aids = aids.to(next(detector.parameters()).device)
    return TrainingDetector(detector, aids)


def finetune_from(model: nn.Module, cfg: Config) -> None:
    """``train.finetune``: loads the weights of a checkpoint in any format (this project's, the original's, a
    state_dict, a transformers folder); class heads of another class count are re-initialised, CoPE offsets in the
    config over the checkpoint's linear ones start with fresh gates (where the attention is the plain one), any other
    difference from ``cfg.model`` is an error naming the override that fixes it."""
    path = cfg.train.finetune
    try:
        checkpoint = read_checkpoint(path)
        check_architecture(cfg.model, checkpoint, finetune=True)
        load_checkpoint(model, checkpoint, fresh_cope=True)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"train.finetune={path}: {exc}") from exc
