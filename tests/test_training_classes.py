"""Training that starts from a checkpoint keeps each class head on the class it learned: resuming or fine-tuning on
data that numbers the same classes otherwise renumbers the data by name, and resuming on other classes is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny_training import tiny_config

from deformable.data import DatasetError
from deformable.training import engine
from models.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(shapes_root, tmp_path_factory) -> str:
    """A 1-epoch run's output folder, read-only for the tests (each copies what it changes)."""
    out = str(tmp_path_factory.mktemp("finished"))
    engine.fit(tiny_config(shapes_root, out, "train.eval_every=0"))
    return out


def _renamed_copy(shapes_root: str, to: Path, rename: dict[str, str]) -> str:
    """The shapes data with category names changed (ids, images and boxes as they were)."""
    shutil.copytree(shapes_root, to)
    for name in os.listdir(to / "annotations"):
        path = to / "annotations" / name
        payload = json.loads(path.read_text())
        for cat in payload["categories"]:
            cat["name"] = rename.get(cat["name"], cat["name"])
        path.write_text(json.dumps(payload))
    return str(to)


def _names(run: str) -> dict[int, str]:
    return read_checkpoint(os.path.join(run, "checkpoint.pth")).class_names


def _swap(names: dict[int, str]) -> dict[str, str]:
    first, second = names[1], names[2]
    return {first: second, second: first}


def test_resuming_on_the_same_classes_numbered_otherwise_renumbers_the_data(finished, shapes_root, tmp_path, capsys):
    names = _names(finished)
    data = _renamed_copy(shapes_root, tmp_path / "swapped", _swap(names))  # class 1 is now called what 2 was
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    engine.fit(tiny_config(data, run, "data.synthetic=", "train.epochs=2", "train.resume=auto", "train.eval_every=0"))
    out = capsys.readouterr().out
    line = f"class ids of the data set renumbered to the checkpoint's by name: {names[2]} 1 -> 2, {names[1]} 2 -> 1"
    assert out.count(line) == 1  # the same for both splits: said once
    assert _names(run) == names  # each head still answers for the class it was trained on


def test_resuming_on_other_classes_is_refused(finished, shapes_root, tmp_path) -> None:
    names = _names(finished)
    data = _renamed_copy(shapes_root, tmp_path / "other", {names[1]: "hexagon"})
    run = str(tmp_path / "run")
    shutil.copytree(finished, run)
    before = Path(run, "checkpoint.pth").read_bytes()
    with pytest.raises(DatasetError) as info:
        engine.fit(tiny_config(data, run, "data.synthetic=", "train.epochs=2", "train.resume=auto"))
    message = str(info.value)
    assert f"trained on the classes 1: {names[1]}" in message and "1: hexagon" in message
    assert "use train.finetune=<checkpoint> with a new output_dir" in message
    assert Path(run, "checkpoint.pth").read_bytes() == before


def test_finetuning_renumbers_the_same_classes_and_says_when_they_differ(finished, shapes_root, tmp_path, capsys):
    checkpoint = os.path.join(finished, "checkpoint.pth")
    names = _names(finished)
    data = _renamed_copy(shapes_root, tmp_path / "swapped", _swap(names))
    run = str(tmp_path / "tuned")
    engine.fit(tiny_config(data, run, "data.synthetic=", f"train.finetune={checkpoint}", "train.eval_every=0"))
    assert "renumbered to the checkpoint's by name" in capsys.readouterr().out
    assert _names(run) == names
    other = _renamed_copy(shapes_root, tmp_path / "other", {n: f"new-{n}" for n in names.values()})
    run = str(tmp_path / "tuned-other")
    engine.fit(tiny_config(other, run, "data.synthetic=", f"train.finetune={checkpoint}", "train.eval_every=0"))
    assert "the class heads are kept as a starting point" in capsys.readouterr().out
    assert _names(run) == {i: f"new-{n}" for i, n in names.items()}
