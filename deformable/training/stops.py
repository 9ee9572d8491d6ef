"""How a run ends before its last epoch, and what continues it: stopped early by ``train.patience`` (and kept stopped
when resumed), diverged (NaN or inf), interrupted (Ctrl-C). Each message names the checkpoint kept and the overrides
that go on from it."""

from __future__ import annotations

import os

import torch

from models.config import TrainConfig

from .resume import BEST_METRIC, latest_checkpoint, stalled
from .run_log import LOG_NAME, logged_record


def stopped_early(output_dir: str, epoch: int, patience: int) -> str | None:
    """The :func:`~.resume.stalled` message when ``epoch``, the last a resumed run trained, was evaluated (its
    ``log.jsonl`` record holds the AP) and had stalled: the run stopped there, whatever ``train.eval_every`` the
    resumed config says (only a larger ``patience`` continues it); else None."""
    record = logged_record(os.path.join(output_dir, LOG_NAME), epoch)
    if record is None or BEST_METRIC not in record:
        return None
    return stalled(output_dir, epoch, patience)


def diverged(cause: str, output_dir: str, epoch: int, train: TrainConfig) -> str:
    """The message for a run whose training of ``epoch`` met NaN or inf (``cause``: "at epoch E step S: what"): the
    checkpoint kept and what to change. A resumed run keeps its learning rates (``RESTORED_SETTINGS``), so a lower one
    takes a new run; gradient clipping and the precision may change on resuming."""
    latest = latest_checkpoint(output_dir)
    rates = f"a lower train.lr (now {train.lr:g})"
    if train.lr_backbone > 0:
        rates += f" and train.lr_backbone (now {train.lr_backbone:g})"
    if os.path.isfile(latest):  # refuse_overwrite: a checkpoint.pth there is this run's, of the epoch before
        kept = f"Its last checkpoint, {latest} (epoch {epoch - 1}), is kept"
        fixes = [
            f"train a new run in another output_dir with {rates} (a resumed run keeps the rates it was trained with; "
            f"train.finetune={latest} starts from its weights)"
        ]
        again = "resume it with train.resume=auto"
    else:
        kept = f"{output_dir} holds no checkpoint of it (epoch {epoch} was its first)"
        fixes, again = [f"train it again with {rates}"], "train it again with"
    if train.clip_max_norm == 0:
        fixes.append(f"{again} train.clip_max_norm=0.1 (gradient clipping, the recipe's)")
    if train.amp == "fp16":
        fixes.append(f"{again} train.amp=bf16 or train.amp=none (fp16 overflows first)")
    return f"training diverged {cause}. {kept}. To go on, {'; or '.join(fixes)}"


def interrupted(output_dir: str) -> str:
    """The line for a run stopped by Ctrl-C: where its last checkpoint is and how to continue it."""
    latest = latest_checkpoint(output_dir)
    if not os.path.isfile(latest):
        return f"interrupted before the run saved a checkpoint in {output_dir}: the same command starts it again"
    epoch = _saved_epoch(latest)
    at = "" if epoch is None else f" (epoch {epoch})"
    return (
        f"interrupted: its last checkpoint is {latest}{at}; train.resume=auto with output_dir={output_dir} continues it"
    )


def _saved_epoch(path: str) -> int | None:
    """The ``epoch`` entry of a checkpoint, read without loading its tensors (None when it cannot be read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # a file torn or not this project's: the line goes without the epoch
        return None
