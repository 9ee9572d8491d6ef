"""Resuming a run: the training state a checkpoint holds (optimiser, schedule, scaler, every process's RNG, the
training-only query aids) and how it is restored, the log a resumed run starts with (another run's, when resuming its
checkpoint) and the epoch a stopped run saved but did not log. Which checkpoint ``train.resume`` names, and what a
run refuses so as not to replace another, is :mod:`.start`'s; reading and writing the files :mod:`models.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from models.checkpoint import RUN_CHECKPOINT, Checkpoint, CheckpointError, copy_checkpoint
from models.config import Config, TrainConfig
from models.weights import load_checkpoint

from . import distributed
from .distributed import DistEnv
from .ema import ema_updates, restore_ema
from .run_log import LOG_NAME, append_log, best_logged, epoch_record, logged_epochs, truncate_log

BEST_METRIC = "AP"  # COCO AP@[.5:.95]: the validation score whose highest epoch checkpoint_best.pth keeps


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain Python values."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str) -> str:
    """``output_dir/checkpoint.pth``: where a run saves after every epoch and ``train.resume=auto`` looks."""
    return os.path.join(output_dir, RUN_CHECKPOINT)


def best_checkpoint(output_dir: str) -> str:
    """``output_dir/checkpoint_best.pth``: a copy of the checkpoint of the epoch with the highest validation AP."""
    return os.path.join(output_dir, "checkpoint_best.pth")


def keep_best(output_dir: str, source: str, epoch: int, metrics: Mapping[str, float]) -> bool:
    """Copies ``source``, the checkpoint of ``epoch`` just evaluated to ``metrics``, to ``checkpoint_best.pth`` when
    its AP is above that of every earlier epoch in ``log.jsonl`` (called before ``epoch`` is logged). Returns
    whether it copied."""
    value = metrics.get(BEST_METRIC)
    if value is None or not math.isfinite(value) or value < 0:  # COCO's -1: nothing to measure it on
        return False
    best = best_logged(os.path.join(output_dir, LOG_NAME), BEST_METRIC, before_epoch=epoch)
    if best is not None and value <= best[0]:
        return False
    copy_checkpoint(source, best_checkpoint(output_dir))
    return True


def stalled(output_dir: str, epoch: int, patience: int) -> str | None:
    """``train.patience``: when ``patience`` > 0 and the best validation AP in ``log.jsonl`` up to ``epoch`` is
    ``patience`` or more epochs old, the message that says the run stops there; else None."""
    if patience <= 0:
        return None
    best = best_logged(os.path.join(output_dir, LOG_NAME), BEST_METRIC, before_epoch=epoch + 1)
    if best is None or epoch - best[1] < patience:
        return None
    return (
        f"stopping early after epoch {epoch}: validation {BEST_METRIC} has not improved for {epoch - best[1]} epochs, "
        f"since epoch {best[1]} ({best[0]:.3f}; train.patience={patience})"
    )


# What a resumed run takes from the checkpoint's optimiser and schedule state, whatever its config says, and what
# else its continuation depends on (the weight average's decay, the seed of the data order): a run can only resume
# with the values it was trained with, which config.yaml then states for the whole run.
RESTORED_SETTINGS = ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "lr_drop", "ema_decay", "seed")


def check_resumable(checkpoint: Checkpoint, train: TrainConfig) -> None:
    """Raises :class:`CheckpointError` when resuming ``checkpoint`` under ``train`` would not do what the config
    says: an optimiser or schedule setting (``RESTORED_SETTINGS``) that differs from the one it was trained with
    (the restored state would silently win), or ``train.epochs`` below the epochs it has trained already."""
    saved = (checkpoint.config or {}).get("train", {})
    lines = [
        f"train.{key}: the checkpoint was trained with {saved[key]!r}, the config says {getattr(train, key)!r} "
        f"(override: train.{key}={saved[key]!r})"
        for key in RESTORED_SETTINGS
        if key in saved and saved[key] != getattr(train, key)
    ]
    if lines:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} cannot resume with this config: a resumed run continues the checkpoint's "
            "optimiser, learning-rate schedule, weight average and data order, so these must be as it was trained:\n  "
            + "\n  ".join(lines)
            + "\nto train on with other values, start a new run from its weights with train.finetune=PATH"
        )
    done = int(checkpoint.entries.get("epoch", -1)) + 1
    if train.epochs < done:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has trained {done} epochs already, more than train.epochs={train.epochs}: "
            f"set train.epochs to {done} or more to resume it (train.epochs={done} only evaluates it)"
        )


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    config: dict[str, Any],
    rng: list[dict[str, Any]],
    class_names: Mapping[int, str] | None = None,
    aids: nn.Module | None = None,
    ema: AveragedModel | None = None,
    epoch_log: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict after ``epoch`` (0-based, completed); ``rng`` holds every process's RNG state and
    ``class_names`` maps category ids (labels) to names, so that inference can name what it finds. ``model`` is the
    detector's own state_dict; the training-only query ``aids`` (``models.training_queries.QueryAids``), when
    given, go to a separate ``query_aids`` entry that only resuming reads. With the weights' moving average ``ema``
    (:mod:`.ema`), ``model`` holds the average (what every tool loads) and ``training_weights`` / ``ema_updates``
    the optimiser's weights and the average's step count (what resuming reads). ``epoch_log`` is the epoch's
    training record for ``log.jsonl`` (``lr``, ``stats``, ``seconds``): a run stopped after saving and before logging
    writes it on resuming (:func:`log_unlogged_epoch`)."""
    state = {
        "model": (model if ema is None else ema.module).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "config": config,
        "class_names": {int(k): str(v) for k, v in (class_names or {}).items()},
        "rng": rng,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if aids is not None:
        state["query_aids"] = aids.state_dict()
    if ema is not None:
        state["training_weights"] = model.state_dict()
        state["ema_updates"] = ema_updates(ema)
    if epoch_log is not None:
        state["epoch_log"] = dict(epoch_log)
    return state


def restore_training_state(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rank: int,
    aids: nn.Module | None = None,
    ema: AveragedModel | None = None,
) -> int:
    """Loads model, query aids, weight average, optimiser, schedule, scaler and this rank's RNG state; returns the
    epoch to start from.

    Raises:
        CheckpointError: the checkpoint holds no training state (not this project's), does not fit the model, or
            was trained with other training-only query options (its ``query_aids`` entry, or none, against
            ``aids``) or another ``train.ema_decay`` setting (its ``training_weights``, or none, against ``ema``).
    """
    state, path = checkpoint.entries, checkpoint.path
    for key in ("optimizer", "lr_scheduler", "epoch"):
        if key not in state:
            raise CheckpointError(
                f"checkpoint {path} ({checkpoint.format} format) has no '{key}' entry, so training cannot resume from "
                "it; use train.finetune=PATH to start a new run from its weights"
            )
    average = checkpoint.model
    checkpoint = _training_weights(checkpoint, ema)
    try:
        load_checkpoint(model, checkpoint, reinit_class_heads=False)
        if ema is not None:
            restore_ema(ema, average, int(state["ema_updates"]))
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model ({exc}); resume with the config it was trained with "
            "(config.yaml beside it)"
        ) from exc
    _restore_aids(checkpoint, aids)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: the optimiser state does not fit this model ({exc})") from exc
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if rank < len(rngs):
        set_rng_state(rngs[rank])
    return int(state["epoch"]) + 1


def _training_weights(checkpoint: Checkpoint, ema: AveragedModel | None) -> Checkpoint:
    """The checkpoint with the optimiser's weights as its model: ``training_weights`` in a run with a weight
    average, ``model`` in one without; both runs must agree."""
    saved, path = checkpoint.entries.get("training_weights"), checkpoint.path
    if saved is None and ema is None:
        return checkpoint
    if ema is None:
        raise CheckpointError(
            f"checkpoint {path} was trained with a moving average of the weights (its config.yaml sets "
            "train.ema_decay) but this run has none: resume with the same train.ema_decay, or start a new run from "
            "its averaged weights with train.finetune=PATH"
        )
    if saved is None:
        raise CheckpointError(
            f"checkpoint {path} has no 'training_weights' entry: it was trained without train.ema_decay, so a run "
            "with a moving average cannot resume from it; resume with train.ema_decay=0, or start a new run from "
            "its weights with train.finetune=PATH"
        )
    return dataclasses.replace(checkpoint, model=saved)


def _restore_aids(checkpoint: Checkpoint, aids: nn.Module | None) -> None:
    """Loads the ``query_aids`` entry into ``aids`` exactly; both must be there, or neither."""
    saved, path = checkpoint.entries.get("query_aids"), checkpoint.path
    if saved is None and aids is None:
        return
    if aids is None:
        raise CheckpointError(
            f"checkpoint {path} was trained with training-only queries (its config.yaml sets training_queries.*) "
            "but this run has them off: resume with the same training_queries options"
        )
    if saved is None:
        raise CheckpointError(
            f"checkpoint {path} has no 'query_aids' entry: it was trained without training-only queries, so a run "
            "with training_queries options on cannot resume from it; resume with them off, or start a new run "
            "from its weights with train.finetune=PATH"
        )
    try:
        aids.load_state_dict(saved, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: its query_aids do not fit the training_queries options ({exc}); resume with the "
            "config it was trained with (config.yaml beside it)"
        ) from exc


def other_run_log(resume: str | None, output_dir: str) -> str | None:
    """The ``log.jsonl`` beside ``resume`` when that checkpoint is another run's (its folder is not ``output_dir``),
    whether or not the file exists; None when not resuming, or resuming the run in ``output_dir``."""
    if resume is None:
        return None
    folder = os.path.dirname(os.path.abspath(resume))
    if os.path.isdir(output_dir) and os.path.samefile(folder, output_dir):
        return None
    return os.path.join(folder, LOG_NAME)


def start_log(output_dir: str, resume: str | None, start_epoch: int) -> None:
    """Prepares ``output_dir/log.jsonl`` for a run that starts at ``start_epoch`` (0: a new run), from the
    checkpoint at ``resume``: it keeps its lines of the epochs before (a run killed after its last checkpoint may have
    logged a later epoch). A run resumed from another run's checkpoint starts with that run's log, the lines of the
    epochs before ``start_epoch`` (plots then show the whole history), or empty where that run's folder has none."""
    log = os.path.join(output_dir, LOG_NAME)
    source = other_run_log(resume, output_dir)
    if source is None:
        truncate_log(log, start_epoch)
    elif os.path.isfile(source):
        kept = truncate_log(log, start_epoch, source)
        history = f"the {kept} record(s) of epochs before {start_epoch} in {source}"
        print(f"{log} starts with the run's history: {history}", flush=True)
        _take_best(output_dir, source, start_epoch)
    else:
        truncate_log(log, 0)
        print(
            f"{resume} has no log.jsonl beside it: the history of its run before epoch {start_epoch - 1} is not "
            f"available in {log}",
            flush=True,
        )


def _take_best(output_dir: str, source_log: str, start_epoch: int) -> None:
    """A run resumed from another's checkpoint, whose history it took, also takes that run's ``checkpoint_best.pth``
    when it is the best of the epochs taken (its run found no better one later), so that this folder keeps the best
    checkpoint its log names; otherwise says where the best so far is, or that no file holds it."""
    best = best_logged(os.path.join(output_dir, LOG_NAME), BEST_METRIC, before_epoch=start_epoch)
    if best is None:
        return
    theirs = best_checkpoint(os.path.dirname(source_log))
    said = f"the best epoch of that history is {best[1]} ({BEST_METRIC} {best[0]:.3f})"
    if best_logged(source_log, BEST_METRIC) == best and os.path.isfile(theirs):
        copy_checkpoint(theirs, best_checkpoint(output_dir))
        print(f"{said}: its checkpoint, {theirs}, copied to {best_checkpoint(output_dir)}", flush=True)
    else:
        print(
            f"{said}, whose checkpoint is not in {os.path.dirname(source_log)} as checkpoint_best.pth: this run "
            f"writes {best_checkpoint(output_dir)} when an epoch beats it",
            flush=True,
        )


def log_unlogged_epoch(
    cfg: Config,
    env: DistEnv,
    resume: str | None,
    start: Checkpoint | None,
    start_epoch: int,
    run_eval: Callable[[], dict[str, float]],
) -> dict[str, float] | None:
    """A run stopped (killed, or its evaluation failed) after saving an epoch's checkpoint and before logging it
    leaves that epoch out of ``log.jsonl``: resuming evaluates it (where it was due) and logs it from the training
    record the checkpoint holds, and writes its periodic copy if that is missing too. So does a run resumed from
    another run's checkpoint whose epoch is not in the log it started with (:func:`start_log`). Returns the metrics
    when it evaluated, else None."""
    epoch = start_epoch - 1
    record = (start.entries.get("epoch_log") if start is not None and resume is not None else None) or None
    log = os.path.join(cfg.output_dir, LOG_NAME)
    if not distributed.broadcast(env.is_main and record is not None and epoch not in logged_epochs(log)):
        return None
    evaluated = evaluates_after(epoch, cfg.train)
    metrics = run_eval() if evaluated else {}
    if env.is_main:
        source = other_run_log(resume, cfg.output_dir)
        if source is not None and not os.path.isfile(source):  # no log to tell whether that run logged it
            print(f"epoch {epoch}: logging the training record {resume} holds", flush=True)
        else:
            where = "" if source is None else f" in {source}"
            print(f"epoch {epoch} was saved but not logged{where} (the run stopped before): logging it now", flush=True)
        keep_best(cfg.output_dir, resume, epoch, metrics)
        append_log(log, epoch_record(epoch, record["lr"], record["stats"], metrics, record["seconds"]))
        every = cfg.train.checkpoint_every
        copy = os.path.join(cfg.output_dir, f"checkpoint_{epoch:04d}.pth")
        if every > 0 and (epoch + 1) % every == 0 and not os.path.isfile(copy):
            copy_checkpoint(resume, copy)
    return metrics if evaluated else None


def evaluates_after(epoch: int, train: TrainConfig) -> bool:
    """After every ``train.eval_every``-th epoch (0: none of them) and after the last one."""
    return epoch + 1 == train.epochs or (train.eval_every > 0 and (epoch + 1) % train.eval_every == 0)
