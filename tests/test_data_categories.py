"""Category ids across splits and checkpoints: evaluation renumbers the ground truth to the checkpoint's ids by
name; a class with validation boxes and no training box is named before training."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from _data_utils import SPLITS, voc_xml, write_coco, write_image, write_voc
from _repo import load_tool
from tiny_training import tiny_config, tiny_overrides

from deformable.data import (
    align_for_training,
    align_to_checkpoint,
    build_dataset,
    checkpoint_ids,
    classes_without_training_boxes,
)
from deformable.training import engine
from models.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")

eval_tool = load_tool("eval")


def test_matching_ids_change_nothing() -> None:
    names = {1: "cat", 2: "dog"}
    assert checkpoint_ids(names, dict(names)) == ({}, [])
    assert checkpoint_ids(names, {}) == ({}, [])  # the checkpoint names no class: ids as they are


def test_ids_follow_the_names_and_unknown_classes_get_fresh_ids() -> None:
    mapping, messages = checkpoint_ids({1: "aardvark", 2: "cat", 3: "dog"}, {1: "cat", 2: "dog"})
    assert mapping == {1: 4, 2: 1, 3: 2}
    assert (
        messages[0]
        == "class ids of the data set renumbered to the checkpoint's by name: aardvark 1 -> 4, cat 2 -> 1, dog 3 -> 2"
    )
    assert "the checkpoint has no class 'aardvark'" in messages[1] and "AP 0" in messages[1]


def test_no_shared_name_is_said_and_changes_nothing() -> None:
    mapping, messages = checkpoint_ids({1: "cat", 2: "dog"}, {0: "LABEL_0", 1: "LABEL_1"})
    assert mapping == {} and len(messages) == 1
    assert "no class of the data set (1: cat, 2: dog) is named as one of the checkpoint's (0: LABEL_0" in messages[0]


def test_another_voc_split_with_an_extra_class_is_renumbered(tmp_path) -> None:
    """VOC numbers the sorted names of the splits it reads: a test split with "aardvark" shifts cat and dog."""
    root = write_voc(str(tmp_path))
    stem, width, height, boxes = "z", 50, 40, [("aardvark", [3, 3, 10, 10])]
    write_image(os.path.join(root, "JPEGImages", f"{stem}.jpg"), width, height, [])
    with open(os.path.join(root, "Annotations", f"{stem}.xml"), "w") as f:
        f.write(voc_xml(stem, width, height, boxes))
    with open(os.path.join(root, "ImageSets", "Main", "test.txt"), "w") as f:
        f.write("".join(f"{s}\n" for s, *_ in SPLITS["val"]) + f"{stem}\n")
    trained_on = build_dataset(DataConfig(root=root, num_workers=0), "train", transforms=False).class_names()
    assert trained_on == {1: "cat", 2: "dog"}
    test = build_dataset(DataConfig(root=root, val_split="test", num_workers=0), "val", transforms=False)
    assert test.class_names() == {1: "aardvark", 2: "cat", 3: "dog"}
    messages = align_to_checkpoint(test, trained_on)
    assert test.class_names() == {1: "cat", 2: "dog", 4: "aardvark"} and len(messages) == 2
    named = {test.coco.cats[a["category_id"]]["name"] for a in test.coco.dataset["annotations"]}
    assert named == {"aardvark", "cat", "dog"}
    for ann in test.coco.dataset["annotations"]:  # every box keeps its class, under the checkpoint's id
        assert ann["category_id"] == {"cat": 1, "dog": 2, "aardvark": 4}[test.coco.cats[ann["category_id"]]["name"]]
    _, target = test[test.ids.index(next(i for i in test.ids if test.coco.imgs[i]["file_name"] == "z.jpg"))]
    assert target["labels"].tolist() == [4]


def test_validation_classes_without_training_boxes_are_named(tmp_path) -> None:
    root = write_coco(str(tmp_path))
    path = os.path.join(root, "annotations", "instances_val2017.json")
    with open(path) as f:
        payload = json.load(f)
    payload["categories"].append({"id": 50, "name": "raccoon"})
    payload["annotations"].append({**payload["annotations"][0], "id": 999, "category_id": 50})
    with open(path, "w") as f:
        json.dump(payload, f)
    cfg = DataConfig(root=root, num_workers=0)
    train, val = (build_dataset(cfg, split, transforms=False) for split in ("train", "val"))
    (warning,) = classes_without_training_boxes(train, val)
    assert "instances_val2017.json has boxes of class 'raccoon' (id 50)" in warning
    assert "instances_train2017.json" in warning and "cannot learn it" in warning
    assert classes_without_training_boxes(train, train) == []


def test_eval_renumbers_a_permuted_copy_of_the_validation_set_back(shapes_root, tmp_path, capsys, monkeypatch) -> None:
    """The shapes set with its category ids permuted: the tool scores the checkpoint against the original ids."""
    out, copy = str(tmp_path / "run"), str(tmp_path / "permuted")
    engine.fit(tiny_config(shapes_root, out))
    shutil.copytree(shapes_root, copy)
    path = os.path.join(copy, "annotations", "instances_val2017.json")
    with open(path) as f:
        original = json.load(f)
    permute = {1: 3, 2: 1, 3: 2}
    payload = {
        **original,
        "categories": [{**c, "id": permute[c["id"]]} for c in original["categories"]],
        "annotations": [{**a, "category_id": permute[a["category_id"]]} for a in original["annotations"]],
    }
    with open(path, "w") as f:
        json.dump(payload, f)
    scored = {}

    def capture(model, postprocessor, loader, coco_gt, **kwargs):
        scored.update({a["id"]: a["category_id"] for a in coco_gt.dataset["annotations"]})
        return {"AP": 0.0}, [], {}

    monkeypatch.setattr(engine, "evaluate", capture)
    argv = [os.path.join("configs", "shapes.yaml"), "--checkpoint", os.path.join(out, "checkpoint.pth")]
    assert eval_tool.main([*argv, *tiny_overrides(copy, str(tmp_path / "eval"))]) == 0
    assert "renumbered to the checkpoint's by name: " in capsys.readouterr().out
    assert scored == {a["id"]: a["category_id"] for a in original["annotations"]}


def test_training_from_scratch_renumbers_the_validation_split_to_the_training_splits_ids(tmp_path) -> None:
    """Two annotation files that number the same classes otherwise (val: dog 1, cat 2, where train has cat 1, dog 2):
    the detector predicts the training split's ids, so validation is scored in them, by name, from scratch too."""
    root = write_coco(str(tmp_path))
    path = os.path.join(root, "annotations", "instances_val2017.json")
    with open(path) as f:
        payload = json.load(f)
    swap = {1: 2, 2: 1}
    payload["categories"] = [{**c, "id": swap[c["id"]]} for c in payload["categories"]]
    payload["annotations"] = [{**a, "category_id": swap[a["category_id"]]} for a in payload["annotations"]]
    with open(path, "w") as f:
        json.dump(payload, f)
    cfg = DataConfig(root=root, num_workers=0)
    train, val = (build_dataset(cfg, split, transforms=False) for split in ("train", "val"))
    assert train.class_names() == {1: "cat", 2: "dog"} and val.class_names() == {1: "dog", 2: "cat"}
    by_name = {a["id"]: val.class_names()[a["category_id"]] for a in val.coco.dataset["annotations"]}
    (message,) = align_for_training(train, val, {}, resuming=False)
    assert message == "class ids of the data set renumbered to the training split's by name: dog 1 -> 2, cat 2 -> 1"
    assert val.class_names() == train.class_names()
    assert {a["id"]: train.class_names()[a["category_id"]] for a in val.coco.dataset["annotations"]} == by_name
    assert align_for_training(train, val, {}, resuming=False) == []  # aligned: nothing more to say
