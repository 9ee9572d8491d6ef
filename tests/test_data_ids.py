"""Ids and labels that would silently mislead: repeated or non-integer COCO ids, negative category ids, YOLO pose
lines and odd data.yaml values, VOC flags, Roboflow-VOC images without XML, and images too thin to resize."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from _data_utils import CLASSES, replace_in_file, write_coco, write_image, write_roboflow_voc, write_voc, write_yolo

from deformable.data import DatasetError, build_dataset
from deformable.data.coco import read_coco_file
from deformable.data.coco_eval import coco_scores
from deformable.data.transforms import resized_shape
from models.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(root: str, split: str = "val"):
    return build_dataset(DataConfig(root=root, num_workers=0), split, transforms=False)


def _edit_coco(root: str, edit) -> str:
    path = os.path.join(root, "annotations", "instances_val2017.json")
    with open(path) as f:
        payload = json.load(f)
    edit(payload)
    with open(path, "w") as f:
        json.dump(payload, f)
    return path


def test_a_repeated_image_id_is_refused_naming_it(tmp_path) -> None:
    # pycocotools keeps the last image of an id: the first image would vanish and its boxes land on the second.
    root = write_coco(str(tmp_path / "c"))
    path = _edit_coco(root, lambda p: p["images"][1].update(id=1))
    with pytest.raises(DatasetError, match=rf"{path}: image id 1 is used twice .*d\.jpg.*e\.jpg"):
        _build(root)


def test_a_repeated_category_id_is_refused_naming_it(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = _edit_coco(root, lambda p: p["categories"].append({"id": 1, "name": "cow"}))
    with pytest.raises(DatasetError, match=rf"{path}: category id 1 is used twice .*cat.*cow"):
        _build(root)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda p: p["images"][0].update(id="d"), r'image id "d" is not an integer'),
        (lambda p: p["images"][0].update(id=True), r"image id true is not an integer"),
        (lambda p: p["categories"][0].update(id=-1), r"category id -1 is negative"),
    ],
)
def test_ids_that_are_no_labels_are_refused(tmp_path, edit, message: str) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = _edit_coco(root, edit)
    with pytest.raises(DatasetError, match=rf"{path}.*{message}"):
        _build(root)


def test_repeated_annotation_ids_are_renumbered_and_score_as_they_should(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    _edit_coco(root, lambda p: [ann.update(id=1) for ann in p["annotations"]])  # a merged export
    dataset = _build(root)
    assert sorted(ann["id"] for ann in dataset.coco.dataset["annotations"]) == [1, 2, 3]
    assert "2 repeated annotation id(s)" in " ".join(dataset.data.notes)
    # The ground truth itself as detections scores 1.0 (with the ids repeated pycocotools scored 0.5).
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in dataset.coco.dataset["annotations"]
    ]
    assert coco_scores(dataset.coco, detections, dataset.ids)[0]["AP"] == pytest.approx(1.0)


def test_read_coco_file_keeps_unique_ids_as_given(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    _edit_coco(root, lambda p: [ann.update(id=10 * ann["id"]) for ann in p["annotations"]])
    data = read_coco_file(
        os.path.join(root, "annotations", "instances_val2017.json"),
        os.path.join(root, "val2017"),
        layout="coco",
        split="val2017",
    )
    assert [ann["id"] for ann in data.coco["annotations"]] == [10, 20, 30] and not data.notes


def _yaml(root: str, **changes) -> None:
    path = os.path.join(root, "data.yaml")
    with open(path) as f:
        payload = yaml.safe_load(f)
    payload.update(changes)
    with open(path, "w") as f:
        yaml.safe_dump(payload, f)


def test_yolo_pose_lines_read_the_box_not_the_keypoints(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    _yaml(root, kpt_shape=[2, 3])
    with open(os.path.join(root, "labels", "val", "d.txt"), "w") as f:  # d is 60 x 50
        f.write("0 0.5 0.4 0.2 0.4 0.45 0.3 2 0.55 0.5 1\n")  # visibility flags 2 and 1 are no coordinates
    with open(os.path.join(root, "labels", "val", "e.txt"), "w") as f:
        f.write("")
    (ann,) = _build(root).coco.dataset["annotations"]
    assert ann["bbox"] == pytest.approx([24.0, 10.0, 12.0, 20.0])


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"kpt_shape": [2, 3]}, r"d\.txt line 1: data.yaml's kpt_shape makes a line 'class cx cy w h' and 6 keypoint"),
        ({"kpt_shape": [17, 4]}, r"kpt_shape must be \[keypoints, 2 or 3\], got \[17, 4\]"),
        ({"names": []}, r"'names' is empty"),
        ({"nc": "two"}, r"nc must be the number of classes, got 'two'"),
        ({"nc": 3}, r"nc is 3 but names has 2 entries"),
    ],
)
def test_odd_data_yaml_values_are_named(tmp_path, changes: dict, message: str) -> None:
    root = write_yolo(str(tmp_path / "y"))
    _yaml(root, **changes)
    with pytest.raises(DatasetError, match=message):
        _build(root)


def test_a_quoted_nc_is_read_as_the_number_it_is(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    _yaml(root, nc="2")
    assert list(_build(root).class_names().values()) == CLASSES


def test_voc_difficult_is_read_in_any_case(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    path = os.path.join(root, "Annotations", "d.xml")
    replace_in_file(path, "<difficult>0</difficult>", "<difficult>True</difficult>")
    annotations = _build(root).coco.dataset["annotations"]
    assert [ann["iscrowd"] for ann in annotations if ann["image_id"] == 1] == [1]


def test_roboflow_voc_images_without_xml_are_left_out_and_counted(tmp_path) -> None:
    root = write_roboflow_voc(str(tmp_path / "r"))
    write_image(os.path.join(root, "valid", "unlabelled.jpg"), 30, 20, [])
    dataset = _build(root)
    assert len(dataset) == 2
    assert any("1 image(s) without an XML file left out (e.g. unlabelled.jpg" in note for note in dataset.data.notes)


@pytest.mark.parametrize(
    "height,width,expected",
    [
        (2, 2000, (1, 1000)),  # the cap would make the short side 0: it stays 1 pixel
        (3000, 3, (1000, 1)),
        (20, 2000, (4, 400)),
        (480, 640, (800, 1066)),  # the original's rule where the cap does not bind
    ],
)
def test_resized_shapes_keep_a_pixel_on_the_short_side(height: int, width: int, expected: tuple) -> None:
    size, max_size = (256, 427) if expected != (800, 1066) else (800, 1333)
    assert resized_shape(height, width, size, max_size) == expected
