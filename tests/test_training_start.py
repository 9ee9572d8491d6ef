"""Where a run starts: what train.resume=auto says when there is nothing to resume, a run's folder named as
train.resume or train.finetune, and going back to an earlier checkpoint of a run (refused in its own folder, with
the override that does it elsewhere)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from tiny_training import tiny_config

from deformable.training import engine
from models.checkpoint import read_checkpoint
from models.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ("train.eval_every=0", "train.max_iters_per_epoch=1")


@pytest.fixture(scope="module")
def periodic(shapes_root: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-epoch tiny run with a copy of every epoch's checkpoint (checkpoint_0000.pth, checkpoint_0001.pth), read-only
    for the tests."""
    run = str(tmp_path_factory.mktemp("periodic"))
    engine.fit(tiny_config(shapes_root, run, "train.epochs=2", "train.checkpoint_every=1", *QUICK))
    return run


def _epoch(path: str) -> int:
    return read_checkpoint(path).entries["epoch"]


def _files(run: str) -> dict[str, bytes]:
    return {name: (Path(run) / name).read_bytes() for name in sorted(os.listdir(run))}


@pytest.mark.parametrize("exists", [False, True])
def test_auto_without_a_checkpoint_says_it_starts_a_new_run(shapes_root, tmp_path, capsys, exists) -> None:
    """Not an error (auto is meant for a first run too), but said: a mistyped output_dir is seen at once."""
    run = tmp_path / "typo_dir"
    if exists:
        run.mkdir()
    engine.fit(tiny_config(shapes_root, str(run), "train.resume=auto", *QUICK))
    missing = "" if exists else " (no such folder yet)"
    assert f"train.resume=auto: no checkpoint in {run}{missing}, starting a new run\n" in capsys.readouterr().out
    assert _epoch(str(run / "checkpoint.pth")) == 0


def test_going_back_in_a_runs_own_folder_is_refused_with_the_way_elsewhere(periodic, shapes_root, capsys) -> None:
    earlier = os.path.join(periodic, "checkpoint_0000.pth")
    before = _files(periodic)
    with pytest.raises(ConfigError) as info:
        engine.fit(tiny_config(shapes_root, periodic, "train.epochs=3", f"train.resume={earlier}", *QUICK))
    message = str(info.value)
    assert message.startswith(f"train.resume={earlier} is an earlier checkpoint of the run in output_dir {periodic}: ")
    assert f"would overwrite what that run saved after it ({periodic}/checkpoint.pth, its log.jsonl" in message
    assert "holds another run" not in message and "own output_dir" not in message
    assert _files(periodic) == before
    elsewhere = re.search(rf"train\.resume={re.escape(earlier)} output_dir=(\S+) ", message).group(1)
    assert elsewhere == f"{periodic}_checkpoint_0000"
    # the override given does it (the folder is beside the fixture's, under pytest's temporary folder)
    engine.fit(tiny_config(shapes_root, elsewhere, "train.epochs=2", f"train.resume={earlier}", *QUICK))
    assert f"resuming from {earlier} at epoch 1" in capsys.readouterr().out
    assert _epoch(os.path.join(elsewhere, "checkpoint.pth")) == 1


def test_a_run_folder_stands_for_its_checkpoint(periodic, shapes_root, tmp_path, capsys) -> None:
    """As Ultralytics users name a run: train.resume=FOLDER (into that folder or another) and train.finetune=FOLDER
    read FOLDER/checkpoint.pth, where it would otherwise be read as an incomplete transformers folder."""
    engine.fit(tiny_config(shapes_root, str(tmp_path / "moved"), "train.epochs=3", f"train.resume={periodic}", *QUICK))
    assert f"resuming from {periodic}/checkpoint.pth at epoch 2" in capsys.readouterr().out
    assert _epoch(str(tmp_path / "moved" / "checkpoint.pth")) == 2
    moved = str(tmp_path / "moved")
    engine.fit(tiny_config(shapes_root, moved, "train.epochs=4", f"train.resume={moved}", *QUICK))  # its own folder
    assert _epoch(os.path.join(moved, "checkpoint.pth")) == 3
    engine.fit(tiny_config(shapes_root, str(tmp_path / "tuned"), f"train.finetune={periodic}", *QUICK))
    assert _epoch(str(tmp_path / "tuned" / "checkpoint.pth")) == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is a folder without a checkpoint\.pth: name a run's folder"):
        engine.fit(tiny_config(shapes_root, str(tmp_path / "x"), f"train.resume={tmp_path / 'empty'}", *QUICK))
