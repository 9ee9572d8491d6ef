"""Training that starts from a checkpoint keeps each class head on the class it learned: resuming or fine-tuning on
data that numbers the same classes otherwise renumbers the data by name, and resuming on other classes is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _repo import load_tool
from tiny_training import tiny_config

from deformable.data import DatasetError
from deformable.data.dataset import coco_api
from deformable.training import engine
from models.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

eval_tool = load_tool("eval")


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


def _evaluate(checkpoint: str, data: str, out: Path) -> tuple[dict, list[dict]]:
    """``tools/eval.py`` on ``data``: its eval.json and detections file."""
    assert (
        eval_tool.main(["--checkpoint", checkpoint, f"data.root={data}", "data.synthetic=", f"output_dir={out}"]) == 0
    )
    summary = json.loads((out / "eval.json").read_text())
    return summary, json.loads((out / "detections_val2017.json").read_text())


def test_eval_writes_detections_in_the_data_sets_own_ids(finished, shapes_root, tmp_path) -> None:
    """A data set numbering the checkpoint's classes otherwise is scored renumbered by name; the detections file
    is in the annotation file's ids, so that it scores against that file as the printed table does."""
    checkpoint = os.path.join(finished, "checkpoint.pth")
    names = _names(finished)
    swapped = _renamed_copy(shapes_root, tmp_path / "swapped", _swap(names))
    plain_summary, plain = _evaluate(checkpoint, shapes_root, tmp_path / "plain")
    swapped_summary, written = _evaluate(checkpoint, swapped, tmp_path / "out")
    assert swapped_summary["AP"] == plain_summary["AP"]
    relabel = {1: 2, 2: 1}  # the swapped file calls class 1 what the checkpoint calls class 2
    assert written == [{**d, "category_id": relabel.get(d["category_id"], d["category_id"])} for d in plain]
    file_ids = {
        cat["id"]
        for cat in json.loads((Path(swapped) / "annotations/instances_val2017.json").read_text())["categories"]
    }
    assert {d["category_id"] for d in written} <= file_ids


def test_the_any_class_row_counts_boxes_named_as_classes_the_ground_truth_lacks() -> None:
    """A model that finds an object but names it as a class of its training the validation data lacks scores in
    the class-agnostic row (its detection is kept), and nowhere per class."""
    gt = coco_api(
        {
            "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0}
            ],
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "star"}],
        }
    )
    loader = [
        (
            torch.zeros(1, 3, 8, 8),
            torch.zeros(1, 8, 8, dtype=torch.bool),
            [{"image_id": 1, "orig_size": torch.tensor([80, 100])}],
        )
    ]

    def postprocessor(outputs, sizes):  # the object found, named "triangle" (id 3, a training class)
        return [
            {"scores": torch.tensor([0.9]), "labels": torch.tensor([3]), "boxes": torch.tensor([[10.0, 10, 40, 30]])}
        ]

    class Stub(torch.nn.Module):
        def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
            return {}

    model = Stub()
    args = dict(device=torch.device("cpu"), show_progress=False, per_class=True)
    _, kept, table = engine.evaluate(model, postprocessor, loader, gt, class_ids=[1, 2, 3], **args)
    assert [d["category_id"] for d in kept] == [3]
    assert table["(any class)"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}
    assert table["circle"]["AP"] == 0.0
    _, dropped, table = engine.evaluate(model, postprocessor, loader, gt, **args)  # no training classes given
    assert dropped == [] and table["(any class)"]["AP"] == 0.0
