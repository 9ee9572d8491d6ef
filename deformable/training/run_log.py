"""What a run leaves for people: one JSON line per epoch in ``log.jsonl``, ``eval.json``, the printed summary."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from deformable.data.coco_eval import AP_NAMES
from models.files import atomic_write

LOG_NAME = "log.jsonl"  # in a run's output_dir, beside its checkpoint.pth


def epoch_record(
    epoch: int, lr: float, stats: Mapping[str, float], metrics: Mapping[str, float], seconds: float
) -> dict[str, Any]:
    """``{"epoch", "lr", "train_<loss term>"..., <COCO metrics when evaluated>..., "time_s"}``."""
    record: dict[str, Any] = {"epoch": epoch, "lr": lr}
    record.update({f"train_{key}": value for key, value in stats.items()})
    record.update(metrics)
    record["time_s"] = round(seconds, 1)
    return record


def append_log(path: str, record: Mapping[str, Any]) -> None:
    """Appends one JSON line to ``log.jsonl``; a value that is no finite number (a mean over no step) is written as
    ``null``: strict JSON has no NaN or Infinity, and readers such as jq refuse them."""
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(finite) + "\n")


def logged_epochs(path: str) -> set[float]:
    """The epochs ``log.jsonl`` holds a line for (none when there is no log)."""
    if not os.path.isfile(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {_epoch_of(line) for line in f}


def logged_record(path: str, epoch: int) -> dict[str, Any] | None:
    """The last ``log.jsonl`` record of ``epoch`` (None when there is none, or no log)."""
    if not os.path.isfile(path):
        return None
    found = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if _epoch_of(line) == epoch:
                found = json.loads(line)
    return found


def best_logged(path: str, metric: str, before_epoch: float = math.inf) -> tuple[float, int] | None:
    """``(value, epoch)`` of the highest finite, non-negative ``metric`` among the ``log.jsonl`` records of epochs
    before ``before_epoch`` (the earliest on a tie); None when no such record has it (or there is no log). COCO writes
    -1 for a metric it cannot measure (no ground truth): not a score."""
    if not os.path.isfile(path):
        return None
    best = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                epoch, value = record["epoch"], record.get(metric)
            except (ValueError, KeyError, TypeError):  # half a line (a kill), or no object
                continue
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if finite and value >= 0 and epoch < before_epoch and (best is None or value > best[0]):
                best = (float(value), int(epoch))
    return best


def truncate_log(path: str, start_epoch: int, source: str | None = None) -> int:
    """Keeps the ``log.jsonl`` lines of epochs before ``start_epoch``: a run killed after its last checkpoint may
    have logged a later epoch, or half a line. With ``source``, another run's ``log.jsonl``, ``path`` is replaced by
    those lines of ``source`` instead (nothing happens when there is no such file). Returns the lines kept."""
    source = path if source is None else source
    if not os.path.isfile(source):
        return 0
    with open(source, encoding="utf-8") as f:
        lines = [line for line in f if _epoch_of(line) < start_epoch]
    atomic_write(path, lambda f: f.write("".join(lines).encode("utf-8")))
    return len(lines)


def _epoch_of(line: str) -> float:
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` as JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(payload).encode("utf-8")))


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``"validation AP 0.512  AP50 0.843 ..."`` (the six AP numbers)."""
    return "validation " + "  ".join(f"{name} {metrics[name]:.3f}" for name in AP_NAMES if name in metrics)
