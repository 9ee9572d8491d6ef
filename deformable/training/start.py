"""Where a run starts: the checkpoint ``train.resume`` names (``auto``, a run's folder, a file), and what a run refuses
so as not to replace another (checkpoints in its output_dir that it does not continue)."""

from __future__ import annotations

import glob
import os

from models.checkpoint import run_folder_checkpoint
from models.config import ConfigError

from . import distributed
from .resume import latest_checkpoint, other_run_log


def resume_path(resume: str, output_dir: str) -> str | None:
    """``train.resume``: "" -> None; "auto" -> ``output_dir/checkpoint.pth`` when it exists; a run's folder -> its
    ``checkpoint.pth`` (:func:`models.checkpoint.run_folder_checkpoint`); else the path itself.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without a ``checkpoint.pth`` (or ``config.json``).
    """
    if resume == "":
        return None
    if resume == "auto":
        latest = latest_checkpoint(output_dir)
        return latest if os.path.isfile(latest) else None
    if not os.path.exists(resume):
        raise FileNotFoundError(
            f"train.resume={resume}: no such checkpoint (train.resume=auto resumes the latest in output_dir)"
        )
    path = run_folder_checkpoint(resume)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):  # nor a transformers folder
        raise FileNotFoundError(
            f"train.resume={resume} is a folder without a checkpoint.pth: name a run's folder or one of its "
            "checkpoint*.pth files"
        )
    return path


def nothing_to_resume(output_dir: str) -> str:
    """What ``train.resume=auto`` says when ``output_dir`` has no checkpoint to continue: a new run starts."""
    missing = "" if os.path.isdir(output_dir) else " (no such folder yet)"
    return f"train.resume=auto: no checkpoint in {output_dir}{missing}, starting a new run"


def refuse_overwrite(output_dir: str, resume: str | None) -> None:
    """Raises ConfigError when a run would train over checkpoints in ``output_dir`` that it does not continue (the
    latest, the best, the periodic copies): a new run (no ``train.resume``), or one resuming another checkpoint
    (rank 0 looks, every rank raises). Nothing a user trained is replaced without being asked."""
    latest = latest_checkpoint(output_dir)
    earlier = sorted(glob.glob(os.path.join(glob.escape(output_dir), "checkpoint*.pth")))
    continued = os.path.isfile(latest) and resume is not None and os.path.samefile(resume, latest)
    if not distributed.broadcast(bool(earlier) and not continued):
        return
    if resume is None and os.path.isfile(latest):
        raise ConfigError(
            f"{latest} exists: output_dir holds an earlier run, which a new run would overwrite. Continue it with "
            "train.resume=auto, start from its weights in another output_dir with train.finetune=PATH, or delete "
            "its checkpoint*.pth files to start afresh there"
        )
    if resume is None:  # copies only (the best, periodic ones): nothing to resume from
        raise ConfigError(
            f"{', '.join(earlier)} exist(s): output_dir holds checkpoints of an earlier run (no checkpoint.pth to "
            "resume), which a new run would overwrite. Train into another output_dir (train.finetune=PATH starts "
            "from one of them), or move them away to start afresh there"
        )
    if other_run_log(resume, output_dir) is None:  # a checkpoint of the run in output_dir, not its latest
        raise ConfigError(_going_back(resume, output_dir))
    raise ConfigError(
        f"train.resume={resume} would continue in output_dir {output_dir}, which holds another run "
        f"({latest if os.path.isfile(latest) else ', '.join(earlier)}) that it would overwrite, its log included. "
        "Resume into that checkpoint's own output_dir or a new one, or use train.resume=auto to continue the run in "
        "output_dir"
    )


def _going_back(resume: str, output_dir: str) -> str:
    """Why resuming an earlier checkpoint of the run in ``output_dir`` there is refused, and where it can go."""
    latest = latest_checkpoint(output_dir)
    later = latest if os.path.isfile(latest) else "its later checkpoint*.pth files"
    stem = os.path.splitext(os.path.basename(resume))[0]
    elsewhere = f"{os.path.normpath(output_dir)}_{stem}"
    auto = "; train.resume=auto continues the run from its latest checkpoint" if os.path.isfile(latest) else ""
    return (
        f"train.resume={resume} is an earlier checkpoint of the run in output_dir {output_dir}: training on from it "
        f"there would overwrite what that run saved after it ({later}, its log.jsonl and checkpoint_best.pth), so it "
        f"is refused. To go back to it, resume it into another output_dir: train.resume={resume} "
        f"output_dir={elsewhere} (its log up to that epoch comes along){auto}"
    )
