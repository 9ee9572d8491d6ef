"""Checkpoints as plain dicts ``{model, optimizer, lr_scheduler, epoch, config, ...}``, written atomically.

A write goes to a temporary file in the destination folder, is flushed and fsynced, and then replaces the target
with ``os.replace``; a process killed at any moment leaves either the previous file or the new one, never a torn one.
Everything saved is a tensor or a plain Python value so that ``torch.load(..., weights_only=True)`` can read it.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def _fsync_dir(directory: str) -> None:
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and renames it onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save_checkpoint(state: Mapping[str, Any], path: str) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


def copy_checkpoint(src: str, dst: str) -> None:
    """Copies ``src`` to ``dst`` atomically (the periodic ``checkpoint_<epoch>.pth`` copies)."""

    def write(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    atomic_write(dst, write)


def remove_stale_temp_files(directory: str) -> None:
    """Deletes the temporary files that a killed writer left in ``directory``."""
    for path in glob.glob(os.path.join(directory, TMP_PREFIX + "*")):
        os.unlink(path)


def read_checkpoint(path: str) -> dict[str, Any]:
    """Loads a checkpoint on the CPU with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated, not a torch checkpoint, or holds no ``model`` state dict.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:300]}); "
            "use another checkpoint (training keeps the previous one intact)"
        ) from exc
    if not isinstance(state, dict) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"checkpoint {path} holds no 'model' state dict (keys: {_keys(state)})")
    return state


def _keys(state: Any) -> str:
    return ", ".join(map(str, list(state)[:10])) if isinstance(state, Mapping) else type(state).__name__


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    """Strict ``load_state_dict`` that explains a mismatch (another architecture or class count) in one message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        details = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                details.append(f"{len(items)} {what} (e.g. {', '.join(items[:3])})")
        raise CheckpointError(
            f"checkpoint {path} was saved from another architecture than the configured model: {'; '.join(details)}. "
            "Use the config the checkpoint was trained with (its 'config' entry / config.yaml beside it), "
            "or train.finetune=PATH to start from it with another class count"
        )
    model.load_state_dict(state_dict)


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


def resume_path(resume: str, output_dir: str) -> str | None:
    """``train.resume``: "" -> None; "auto" -> ``output_dir/checkpoint.pth`` when it exists; else the path itself."""
    if resume == "":
        return None
    if resume == "auto":
        latest = os.path.join(output_dir, "checkpoint.pth")
        return latest if os.path.isfile(latest) else None
    return resume


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    config: dict[str, Any],
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """The checkpoint dict after ``epoch`` (0-based, completed); ``rng`` holds every process's RNG state."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "epoch": epoch,
        "config": config,
        "rng": rng,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def restore_training_state(
    state: Mapping[str, Any],
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    rank: int,
) -> int:
    """Loads model, optimiser, schedule, scaler and this rank's RNG state; returns the epoch to start from."""
    for key in ("optimizer", "lr_scheduler", "epoch"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no '{key}' entry, so training cannot resume from it")
    load_model_state(model, state["model"], path)
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
