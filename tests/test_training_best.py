"""checkpoint_best.pth: the checkpoint of the epoch with the highest validation AP, kept across resumes, and counted
among the checkpoints a new run refuses to overwrite."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_training import tiny_config

from deformable.training import engine, fit
from deformable.training.run_log import best_logged
from models.checkpoint import read_checkpoint
from models.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _scores(monkeypatch: pytest.MonkeyPatch, aps: list[float]) -> list[float]:
    """Makes each evaluation report the next AP of ``aps`` (the model is not run); returns the APs not used yet."""
    left = list(aps)

    def evaluate(*args, **kwargs):
        ap = left.pop(0)
        return {"AP": ap, "AP50": min(1.0, 2 * ap)}, [], {}

    monkeypatch.setattr(engine, "evaluate", evaluate)
    return left


def _epoch_of(path: Path) -> int:
    return read_checkpoint(str(path)).entries["epoch"]


def _fit(shapes_root: str, run: Path, epochs: int, *extra: str) -> None:
    fit(tiny_config(shapes_root, str(run), f"train.epochs={epochs}", "train.checkpoint_every=1", *extra))  # public API


def test_the_best_epoch_is_kept_and_survives_resumes(shapes_root, tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    left = _scores(monkeypatch, [0.1, 0.3, 0.2])
    _fit(shapes_root, run, 3)
    assert left == []
    best = run / "checkpoint_best.pth"
    assert _epoch_of(best) == 1 and best.read_bytes() == (run / "checkpoint_0001.pth").read_bytes()
    assert f"best AP 0.300 at epoch 1: {best}" in capsys.readouterr().out

    _scores(monkeypatch, [0.3])  # level with the best: the earlier epoch stays
    _fit(shapes_root, run, 4, "train.resume=auto")
    assert _epoch_of(best) == 1

    _scores(monkeypatch, [0.35])
    _fit(shapes_root, run, 5, "train.resume=auto")
    assert _epoch_of(best) == 4 and best.read_bytes() == (run / "checkpoint_0004.pth").read_bytes()


def test_epochs_not_evaluated_are_not_candidates(shapes_root, tmp_path, monkeypatch) -> None:
    """With train.eval_every=2 only epochs 1 and 2 (the last) are scored."""
    run = tmp_path / "run"
    _scores(monkeypatch, [0.2, 0.1])
    _fit(shapes_root, run, 3, "train.eval_every=2")
    assert _epoch_of(run / "checkpoint_best.pth") == 1


def test_an_epoch_evaluated_on_resume_can_be_the_best(shapes_root, tmp_path, monkeypatch) -> None:
    """An epoch saved but not logged (its evaluation failed) is evaluated when the run resumes, and competes."""
    run = tmp_path / "run"

    def evaluations() -> Iterator[dict]:
        yield {"AP": 0.1}
        raise FileNotFoundError("an image went missing")

    scores = evaluations()
    monkeypatch.setattr(engine, "evaluate", lambda *a, **k: (next(scores), [], {}))
    with pytest.raises(FileNotFoundError):
        _fit(shapes_root, run, 2)
    assert _epoch_of(run / "checkpoint_best.pth") == 0
    _scores(monkeypatch, [0.5])  # epoch 1, evaluated on resuming: the run has no epoch left to train
    _fit(shapes_root, run, 2, "train.resume=auto")
    assert _epoch_of(run / "checkpoint_best.pth") == 1


def test_a_new_run_over_a_best_checkpoint_alone_is_refused(shapes_root, tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    _scores(monkeypatch, [0.1])
    _fit(shapes_root, run, 1)
    for name in os.listdir(run):
        if name != "checkpoint_best.pth" and name.startswith("checkpoint"):
            os.remove(run / name)
    before = (run / "checkpoint_best.pth").read_bytes()
    with pytest.raises(ConfigError, match=r"checkpoint_best\.pth exist\(s\): output_dir holds checkpoints") as info:
        _fit(shapes_root, run, 1)
    assert "train.resume=auto" not in str(info.value)  # there is no checkpoint.pth to resume
    with pytest.raises(ConfigError, match="exist"):
        _fit(shapes_root, run, 1, "train.resume=auto")  # auto finds nothing to resume: still a new run
    assert (run / "checkpoint_best.pth").read_bytes() == before


def test_best_logged_reads_what_a_killed_run_leaves(tmp_path) -> None:
    log = tmp_path / "log.jsonl"
    assert best_logged(str(log), "AP") is None  # no log
    lines = [{"epoch": 0, "AP": 0.2}, {"epoch": 1}, {"epoch": 2, "AP": None}, {"epoch": 3, "AP": 0.4}]
    log.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"epoch": 4, "AP": 0.9')  # half a line: a kill
    assert best_logged(str(log), "AP") == (0.4, 3)
    assert best_logged(str(log), "AP", before_epoch=3) == (0.2, 0)
    assert best_logged(str(log), "AP", before_epoch=0) is None


def test_patience_stops_a_run_whose_ap_stalls_and_it_stays_stopped(shapes_root, tmp_path, monkeypatch, capsys) -> None:
    """train.patience=2: the best AP at epoch 1, none better at epochs 2 and 3: the run stops after epoch 3; resumed,
    it is evaluated only; resumed with a larger patience, it trains on."""
    run = tmp_path / "run"
    left = _scores(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.9, 0.9])
    _fit(shapes_root, run, 8, "train.patience=2")
    assert left == [0.9, 0.9] and _epoch_of(run / "checkpoint.pth") == 3
    with open(run / "log.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2, 3]
    assert "stopping early after epoch 3: validation AP has not improved for 2 epochs, since epoch 1" in (
        capsys.readouterr().out
    )
    _fit(shapes_root, run, 8, "train.patience=2", "train.resume=auto")
    assert left == [0.9] and _epoch_of(run / "checkpoint.pth") == 3  # evaluated only
    assert "evaluating it only (a larger train.patience continues it)" in capsys.readouterr().out
    left = _scores(monkeypatch, [0.5, 0.4, 0.4, 0.4, 0.4, 0.4])
    _fit(shapes_root, run, 10, "train.patience=3", "train.resume=auto")  # epoch 3 was 2 epochs past the best
    assert _epoch_of(run / "checkpoint.pth") == 7 and len(left) == 2  # the new best at epoch 4, 3 epochs later: stop
    assert _epoch_of(run / "checkpoint_best.pth") == 4


def test_a_run_stopped_early_stays_stopped_under_another_eval_every(shapes_root, tmp_path, monkeypatch, capsys) -> None:
    """Whether the run stopped is read from its log (the epoch it stopped at was evaluated and had stalled), not from
    the resumed config's train.eval_every, which may skip that epoch; the start line says it is evaluated only."""
    run = tmp_path / "run"
    _scores(monkeypatch, [0.3, 0.1, 0.1])
    _fit(shapes_root, run, 6, "train.patience=2")
    assert "stopping early after epoch 2" in capsys.readouterr().out
    left = _scores(monkeypatch, [0.2, 0.9])
    _fit(shapes_root, run, 6, "train.patience=2", "train.eval_every=2", "train.resume=auto")
    out = capsys.readouterr().out
    assert left == [0.9] and _epoch_of(run / "checkpoint.pth") == 2  # evaluated only, epoch 3 not trained
    with open(run / "log.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]
    assert f"training {run}: " in out and "stopped early after epoch 2: evaluating it only" in out
    assert "epochs 3..5" not in out and "evaluating it only (a larger train.patience continues it)" in out
    assert "resuming from" not in out  # it does not resume
    left = _scores(monkeypatch, [0.5, 0.4])  # epochs 3 and 5 (the last) are evaluated
    _fit(shapes_root, run, 6, "train.patience=3", "train.eval_every=2", "train.resume=auto")
    assert left == [] and _epoch_of(run / "checkpoint.pth") == 5
    out = capsys.readouterr().out
    assert "epochs 3..5" in out and "at epoch 3" in out and "resuming from" in out
