"""Everything a run needs before its first step: the output folder, the data, the model (and its weights)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from deformable.data import (
    DatasetError,
    DetectionDataset,
    align_for_training,
    align_to_checkpoint,
    build_dataset,
    build_loader,
    check_has_boxes,
    check_num_classes,
    classes_without_training_boxes,
    ensure_synthetic,
    resolve_layout,
    summarise,
    validation_without_boxes,
)
from deformable.data.scan import find_bad_images
from deformable.data.shapes import read_marker
from deformable.data.sizes import check_image_size, resolve_image_size
from models import build_detector, load_checkpoint, read_checkpoint
from models.checkpoint import Checkpoint, CheckpointError
from models.config import Config, ConfigError, ModelConfig, save_config
from models.files import FolderError, make_dir, remove_stale_temp_files
from models.loading import check_architecture
from models.training_queries import TrainingDetector, build_query_aids, check_query_options

from . import distributed
from .distributed import DistEnv
from .resume import check_resumable
from .run_lock import run_lock


def check_options(cfg: Config) -> None:
    """The checks of options that depend on one another and need no data, made before a run writes anything:
    ``data.image_size`` beside sizes it would replace, ``train.patience`` without evaluations to judge by,
    ``training_queries`` against ``model.two_stage`` (what :func:`build_query_aids` checks again); a warning for
    ``model.cope_channels`` set where no attention has CoPE offsets. A value out of its own range is refused when the
    config is read.

    Raises:
        ConfigError: naming the options and how to make them agree.
    """
    check_image_size(cfg.data)
    if cfg.train.patience > 0 and cfg.train.eval_every == 0:
        raise ConfigError(
            f"train.patience={cfg.train.patience} stops a run on its validation AP, which train.eval_every=0 measures "
            "after the last epoch only: set train.eval_every >= 1, or train.patience=0"
        )
    q = cfg.training_queries
    check_query_options(q.dn_groups, q.dn_label_noise, q.dn_box_noise, q.query_groups, cfg.model.two_stage)
    modes = (cfg.model.enc_offset_mode, cfg.model.dec_offset_mode)
    if cfg.model.cope_channels != ModelConfig.cope_channels and "cope" not in modes:
        warnings.warn(
            f"model.cope_channels={cfg.model.cope_channels} has no effect: no attention has CoPE offsets "
            "(model.enc_offset_mode and model.dec_offset_mode are linear; set either to cope)",
            stacklevel=2,
        )


def check_data_location(cfg: Config) -> None:
    """Refuses a ``data.root`` that does not exist or holds none of the layouts read (unless ``data.synthetic``
    generates the data there), before a run or an evaluation writes anything; the annotation files themselves are
    read, and checked, with the data.

    Raises:
        DatasetError: naming ``data.root``, the layouts looked for and what the folder holds.
    """
    if not cfg.data.synthetic:
        resolve_layout(cfg.data)


def check_start(cfg: Config, resume: str | None, start: Checkpoint | None) -> None:
    """The checks of the checkpoint a run starts from that need no data, made before a run writes anything: resuming
    (``resume`` given), its architecture and class count must be the config's and the optimiser and schedule
    settings those it was trained with (:func:`~.resume.check_resumable`); fine-tuning, its architecture must fit
    (:func:`finetune_from`). ``model.num_classes=auto`` is resolved from the data later, and checked again then.

    Raises:
        CheckpointError: naming the checkpoint (``train.finetune`` when fine-tuning) and the overrides that fit it.
    """
    if start is None:
        return
    model = cfg.model
    classes = start.options.get("num_classes")
    if model.num_classes == "auto" and isinstance(classes, int) and not isinstance(classes, bool) and classes >= 1:
        model = dataclasses.replace(model, num_classes=classes)
    if resume is not None:
        check_architecture(model, start)  # names the overrides, where loading would list keys
        check_resumable(start, cfg.train)
        return
    try:
        check_architecture(model, start, finetune=True)
    except ValueError as exc:
        raise CheckpointError(f"train.finetune={cfg.train.finetune}: {exc}") from exc


def prepare_data(cfg: Config, env: DistEnv) -> None:
    """Rank 0 generates the synthetic data set if asked (only into a folder it generated itself); the other ranks
    wait for it. Called once every check that can refuse the run without reading the data has passed
    (:func:`check_options`, the overwrite refusal, :func:`check_start`): a refused run leaves the data set as it
    was."""
    if env.is_main:
        ensure_synthetic(cfg.data)  # it refuses a data.root that holds other data
    distributed.barrier()


def prepare_output_dir(cfg: Config, env: DistEnv, held: ExitStack) -> None:
    """Rank 0 creates ``output_dir``, takes its lock (:mod:`.run_lock`, held until ``held`` closes: a second run
    on the folder is refused) and clears temporary files of a killed run; the other ranks wait for it. Called once
    the data is read and every image checked (:func:`build_data`): a run refused for its data leaves no output_dir
    behind."""
    error = None
    if env.is_main:
        if _is_within(cfg.output_dir, cfg.data.root):
            print(
                f"warning: output_dir {cfg.output_dir} is inside data.root {cfg.data.root}: the run's checkpoints and "
                "logs are written among your data (and a generated data set holding them is not regenerated); "
                "choose an output_dir outside it, e.g. runs/<name>",
                flush=True,
            )
        try:
            make_dir(cfg.output_dir, "output_dir")
            held.enter_context(run_lock(cfg.output_dir))
            remove_stale_temp_files(cfg.output_dir)
        except (FolderError, OSError) as exc:  # a file there, no permission: every rank stops with its message
            error = exc
    distributed.raise_from_main(error)  # the other ranks wait for the folder here


def _is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


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


def build_data(
    cfg: Config,
    env: DistEnv,
    train: bool = True,
    checkpoint_names: dict[int, str] | None = None,
    resuming: bool = False,
) -> Data:
    """The validation split (and with ``train`` the training split) of any layout, sharded over ``env``'s
    processes, every image checked first (:func:`check_images`); rank 0 prints one summary line per split, with a
    warning when an image holds more objects than ``model.num_queries`` and one per class with validation boxes and
    no training box.

    ``checkpoint_names`` is a checkpoint's category id -> name. Evaluating it (not ``train``), the validation
    split's ids are renumbered to the checkpoint's by name (:func:`~deformable.data.categories.align_to_checkpoint`).
    Training from it (``resuming`` it, or fine-tuning), both splits are renumbered when they name the same classes,
    and resuming on other classes is refused (:func:`~deformable.data.categories.align_for_training`). Rank 0 says
    what moved."""
    args = dict(num_workers=cfg.data.num_workers, rank=env.rank, world_size=env.world_size, seed=cfg.train.seed)
    val_set = build_dataset(cfg.data, "val")
    notes = [] if train else align_to_checkpoint(val_set, checkpoint_names or {})
    val_loader = build_loader(val_set, batch_size=cfg.train.batch_size, train=False, **args)
    train_set, train_loader = None, None
    if train:
        train_set = build_dataset(cfg.data, "train")
        notes += align_for_training(train_set, val_set, checkpoint_names or {}, resuming=resuming)
        check_has_boxes(train_set)
        check_num_classes(train_set, cfg.model.num_classes)
        notes += classes_without_training_boxes(train_set, val_set) + validation_without_boxes(val_set)
        train_loader = build_loader(train_set, batch_size=cfg.train.batch_size, train=True, **args)
    check_images(cfg, env, [dataset for dataset in (train_set, val_set) if dataset is not None])
    if env.is_main:
        for dataset in (train_set, val_set):
            if dataset is not None:
                print(summarise(dataset, cfg.model.num_queries), flush=True)
        for note in notes:
            print(note, flush=True)
    return Data(train_set, val_set, train_loader, val_loader)


def check_images(cfg: Config, env: DistEnv, datasets: list[DetectionDataset]) -> None:
    """Refuses the run when the loader would refuse an image of ``datasets`` (unreadable, truncated, or of another
    size than its annotations give), naming them all at once, before training; rank 0 checks, for every rank. The
    synthetic data set, written by this project (it holds the marker file), is not checked.

    Raises:
        DatasetError: naming the images, each with its reason (:func:`~deformable.data.scan.find_bad_images`).
    """
    generated = cfg.data.synthetic == "shapes" and read_marker(cfg.data.root) is not None
    found = None if generated or not env.is_main else find_bad_images(datasets)
    found = distributed.broadcast(found)
    if found is not None:
        raise DatasetError(found)


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


def read_start(cfg: Config, env: DistEnv, resume: str | None) -> Checkpoint | None:
    """The checkpoint training starts from: ``resume`` (the run's own), else ``train.finetune`` (any format: this
    project's, the original's, a state_dict, a transformers folder), else None (from scratch).

    Raises:
        CheckpointError: a rank other than 0 cannot see ``resume``, or the fine-tuning checkpoint cannot be read
            (the message names ``train.finetune``).
    """
    if resume is not None:
        if env.rank != 0 and not os.path.isfile(resume):
            raise CheckpointError(
                f"rank {env.rank} cannot see the checkpoint {resume} that rank 0 resumes from: with several nodes, "
                "output_dir must be on a file system that every node mounts"
            )
        return read_checkpoint(resume)
    return _read_finetune(cfg.train.finetune) if cfg.train.finetune else None


def _read_finetune(path: str) -> Checkpoint:
    try:
        return read_checkpoint(path)  # a run's folder: its checkpoint.pth
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"train.finetune={path}: {exc}") from exc


def finetune_from(model: nn.Module, cfg: Config, checkpoint: Checkpoint | None = None) -> None:
    """``train.finetune``: loads ``checkpoint`` (read from ``cfg.train.finetune`` when not given: :func:`read_start`);
    class heads of another class count are re-initialised, CoPE offsets in the config over the checkpoint's linear
    ones start with fresh gates (where the attention is the plain one), any other difference from ``cfg.model`` is
    an error naming the override that fixes it."""
    if checkpoint is None:
        checkpoint = _read_finetune(cfg.train.finetune)
    try:
        check_architecture(cfg.model, checkpoint, finetune=True)
        load_checkpoint(model, checkpoint, fresh_cope=True)
    except ValueError as exc:
        raise CheckpointError(f"train.finetune={cfg.train.finetune}: {exc}") from exc
