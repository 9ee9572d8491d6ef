"""Every malformed input of the four layouts is a DatasetError naming the file (and the line where it applies)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import yaml
from _data_utils import CLASSES, write_coco, write_roboflow, write_roboflow_voc, write_voc, write_yolo

from deformable.data import DatasetError, build_dataset, check_has_boxes
from models.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(root: str, split: str = "val", **kwargs):
    return build_dataset(DataConfig(root=root, num_workers=0, **kwargs), split, transforms=False)


def _label(root: str, text: str, stem: str = "d") -> str:
    path = os.path.join(root, "labels", "val", f"{stem}.txt")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize(
    "text,message",
    [
        ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n", r"line 2: expected 'class cx cy w h' \(5 numbers\).*got 4 field"),
        ("0 0.5 0.5 0.2 0.2 0.9\n", r"line 1: expected .*got 6 field"),
        ("\n0 0.5 half 0.2 0.2\n", r"line 2: not a number in '0 0.5 half 0.2 0.2'"),
        ("0 0.5 0.5 1.3 0.2\n", r"line 1: coordinates must be normalised to \[0, 1\]"),
        ("0 -0.2 0.5 0.1 0.2\n", r"line 1: coordinates must be normalised"),
        ("2 0.5 0.5 0.2 0.2\n", r"line 1: class 2 is outside the 2 classes of data.yaml's names \(indices 0..1\)"),
        ("0.5 0.5 0.5 0.2 0.2\n", r"line 1: class 0.5 is outside"),
    ],
)
def test_malformed_yolo_label_lines(tmp_path, text: str, message: str) -> None:
    root = write_yolo(str(tmp_path / "y"))
    path = _label(root, text)
    with pytest.raises(DatasetError, match=re.escape(path) + " " + message):
        _build(root)


def test_yolo_values_just_outside_the_image_are_tolerated_and_clipped(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    _label(root, "0 0.1 0.5 0.205 0.2\n")  # reaches x = -0.0025
    dataset = _build(root)
    assert dataset.data.clipped == 1 and dataset.coco.dataset["annotations"][0]["bbox"][0] == 0.0


def test_data_yaml_without_names(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    with open(os.path.join(root, "data.yaml"), "w") as f:
        yaml.safe_dump({"train": "images/train", "val": "images/val"}, f)
    with pytest.raises(DatasetError, match=r"data.yaml has no 'names': list the class names"):
        _build(root)


@pytest.mark.parametrize(
    "payload,message",
    [
        ("names: [a, b\n", r"data.yaml is not valid YAML"),
        ("- a\n- b\n", r"data.yaml must hold a mapping"),
        ("names: cat\ntrain: images/train\nval: images/val\n", r"data.yaml: 'names' must be a list"),
        ("names: [cat, dog]\nnc: 3\nval: images/val\n", r"data.yaml: nc is 3 but names has 2 entries"),
        ("names: [cat, dog]\ntrain: images/train\n", r"data.yaml has no 'val' entry"),
        ("names: [cat, dog]\nval: images/nowhere\n", r"data.yaml: 'val' points to .*nowhere, which does not exist"),
        (
            "names: [cat, dog]\nval: data.yaml\n",
            r"data.yaml: 'val' points to .*data.yaml, which is no folder and no .txt list",
        ),
    ],
)
def test_malformed_data_yaml(tmp_path, payload: str, message: str) -> None:
    root = write_yolo(str(tmp_path / "y"))
    with open(os.path.join(root, "data.yaml"), "w") as f:
        f.write(payload)
    with pytest.raises(DatasetError, match=message):
        _build(root)


def test_yolo_list_file_naming_a_missing_image(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("images/val/d.jpg\nimages/val/gone.jpg\n")
    with open(os.path.join(root, "data.yaml"), "w") as f:
        yaml.safe_dump({"val": "val.txt", "names": CLASSES}, f)
    with pytest.raises(DatasetError, match=r"val.txt line 2: image .*gone.jpg does not exist"):
        _build(root)


def test_coco_category_not_in_categories(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = os.path.join(root, "annotations", "instances_val2017.json")
    payload = json.load(open(path))
    payload["annotations"][1]["category_id"] = 7
    json.dump(payload, open(path, "w"))
    with pytest.raises(DatasetError, match=r"instances_val2017.json: annotation id 2 .* has category_id 7, which is"):
        _build(root)


def test_unreadable_image_is_named_when_read(tmp_path) -> None:
    root = write_roboflow(str(tmp_path / "r"))
    path = os.path.join(root, "valid", "e.jpg")
    with open(path, "wb") as f:
        f.write(b"not a jpeg at all")
    dataset = _build(root)  # sizes come from the annotation file: nothing is read yet
    dataset[0]
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {path} (image id 2)")):
        dataset[1]


def test_unreadable_image_of_a_yolo_split_is_named(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    path = os.path.join(root, "images", "val", "e.jpg")
    with open(path, "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(DatasetError, match=re.escape(f"cannot read image {path}")):
        _build(root)  # YOLO needs each image's size to turn normalised boxes into pixels


def test_malformed_voc_xml(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    path = os.path.join(root, "Annotations", "e.xml")
    with open(path, "w") as f:
        f.write("<annotation>\n<object><name>cat</name>\n</annotation>\n")
    with pytest.raises(DatasetError, match=re.escape(f"malformed XML in {path} (line 3, column")):
        _build(root)


@pytest.mark.parametrize(
    "body,message",
    [
        ("<object><difficult>0</difficult></object>", r"object 1 needs a <name> and a <bndbox>"),
        (
            "<object><name>cat</name><bndbox><xmin>one</xmin><ymin>1</ymin><xmax>3</xmax><ymax>3</ymax></bndbox>"
            "</object>",
            r"<xmin> must be a number, got 'one'",
        ),
    ],
)
def test_voc_object_without_box(tmp_path, body: str, message: str) -> None:
    root = write_voc(str(tmp_path / "v"))
    path = os.path.join(root, "Annotations", "e.xml")
    with open(path, "w") as f:
        f.write(f"<annotation><filename>e.jpg</filename>{body}</annotation>")
    with pytest.raises(DatasetError, match=re.escape(path) + ": " + message):
        _build(root)


def test_voc_split_naming_missing_files(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    split = os.path.join(root, "ImageSets", "Main", "val.txt")
    with open(split, "a") as f:
        f.write("ghost\n")
    with pytest.raises(DatasetError, match=re.escape(f"{split} line 3: ghost has no annotation file")):
        _build(root)
    with open(split, "w") as f:
        f.write("d\ne.jpg\n")  # a list naming files, not ids
    with pytest.raises(DatasetError, match=re.escape("(the list names images without extension: e, not e.jpg)")):
        _build(root)
    with open(split, "w") as f:
        f.write("d\ne\n")
    os.remove(os.path.join(root, "JPEGImages", "e.jpg"))
    with open(split, "w") as f:
        f.write("d\ne\n")
    with pytest.raises(DatasetError, match=re.escape(f"{split} line 2: no image for e in")):
        _build(root)


def test_voc_missing_split_file_lists_the_splits_there(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    with pytest.raises(DatasetError, match=r"holdout.txt does not exist \(splits found: train, val\)"):
        _build(root, val_split="holdout")


def test_voc_without_split_files_says_how_to_write_them(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    for name in ("train.txt", "val.txt"):
        os.remove(os.path.join(root, "ImageSets", "Main", name))
    with pytest.raises(DatasetError, match=r"nor does any other in .*Main: VOC lists each split's images in"):
        _build(root, val_split="val")


def test_a_training_split_without_boxes_is_refused_before_training(tmp_path) -> None:
    """A YOLO set whose labels/ folder is missing trains on nothing: an error naming what was looked for."""
    root = write_yolo(str(tmp_path / "y"))
    shutil.rmtree(os.path.join(root, "labels"))
    train = _build(root, "train")
    with pytest.raises(DatasetError, match=r"yolo split 'train' \(.*\) has no box to train on: no label file found"):
        check_has_boxes(train)
    check_has_boxes(_build(write_yolo(str(tmp_path / "whole")), "train"))


def test_roboflow_voc_missing_split_folder_lists_the_folders_there(tmp_path) -> None:
    root = write_roboflow_voc(str(tmp_path / "r"))
    with pytest.raises(DatasetError, match=r"holdout does not exist \(folders found: train, valid\)"):
        _build(root, val_split="holdout")


def test_split_without_images(tmp_path) -> None:
    voc = write_voc(str(tmp_path / "v"))
    open(os.path.join(voc, "ImageSets", "Main", "val.txt"), "w").close()
    with pytest.raises(DatasetError, match=r"the voc split 'val' has no images: .*val.txt lists none"):
        _build(voc)
    yolo = write_yolo(str(tmp_path / "y"))
    for name in os.listdir(os.path.join(yolo, "images", "val")):
        os.remove(os.path.join(yolo, "images", "val", name))
    with pytest.raises(DatasetError, match=r"the yolo split 'val' has no images: .*data.yaml \(val: .*images/val\)"):
        _build(yolo)
    coco = write_coco(str(tmp_path / "c"))
    path = os.path.join(coco, "annotations", "instances_val2017.json")
    json.dump({"images": [], "annotations": [], "categories": []}, open(path, "w"))
    with pytest.raises(DatasetError, match=r"the coco split 'val2017' has no images"):
        _build(coco)


@pytest.mark.parametrize(
    "text,message",
    [
        # the reason ends the message: no download hint for a file that is there
        ('{"images": [ ...', r"malformed \(JSONDecodeError: Expecting value: line 1 column 14 \(char 13\)\)$"),
        ("[]", r"malformed: the top level is not a JSON object"),
        ('{"images": [], "annotations": []}', r"malformed: no 'categories' list"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"image entry .* needs an 'id' and a"),
        ('{"images": [], "annotations": [], "categories": [{"name": "x"}]}', r"category .* needs an integer 'id'"),
    ],
)
def test_malformed_coco_file(tmp_path, text: str, message: str) -> None:
    root = write_coco(str(tmp_path / "c"))
    with open(os.path.join(root, "annotations", "instances_val2017.json"), "w") as f:
        f.write(text)
    with pytest.raises(DatasetError, match=message):
        _build(root)


def test_malformed_coco_annotation_and_missing_image(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = os.path.join(root, "annotations", "instances_val2017.json")
    payload = json.load(open(path))
    del payload["annotations"][0]["bbox"]
    json.dump(payload, open(path, "w"))
    with pytest.raises(DatasetError, match=r"malformed: annotation id 1: its bbox is missing and it has no segm"):
        _build(root)
    write_coco(root)
    os.remove(os.path.join(root, "val2017", "d.jpg"))
    with pytest.raises(DatasetError, match=r"1 image\(s\) listed in .*instances_val2017.json are missing .*d\.jpg"):
        _build(root)
