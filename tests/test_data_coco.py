"""The COCO layout as before the move: images read, images without annotations kept, files named in errors; CVAT's
export, annotations that say which condition they fail or take their box from the segmentation, one image file under
two ids, file names in another Unicode normalisation."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import unicodedata

import cv2
import numpy as np
import pytest
import torch
from _data_utils import coco_payload, write_coco, write_json
from pycocotools import mask as mask_utils

from deformable.data import DatasetError, build_dataset, read_split
from models.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_coco(root: str, images: list[dict], annotations: list[dict], split: str = "val2017") -> None:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for info in images:
        picture = np.full((info["height"], info["width"], 3), 90, dtype=np.uint8)
        cv2.imwrite(os.path.join(root, split, info["file_name"]), picture)
    payload = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(payload, f)


def _data_cfg(root: str, **kwargs) -> DataConfig:
    return DataConfig(root=root, val_size=64, val_max_size=100, num_workers=0, **kwargs)


def test_dataset_reads_images_and_allows_images_without_annotations(tmp_path) -> None:
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 40, "width": 60},
        {"id": 2, "file_name": "b.jpg", "height": 50, "width": 50},
    ]
    _write_coco(
        str(tmp_path), images, [{"id": 1, "image_id": 1, "bbox": [6, 4, 30, 20], "category_id": 1, "iscrowd": 0}]
    )
    dataset = build_dataset(_data_cfg(str(tmp_path)), "val")
    assert len(dataset) == 2 and dataset.split == "val2017" and dataset.class_names() == {1: "thing"}
    image, target = dataset[0]
    assert image.shape == (3, 64, 96) and target["labels"].tolist() == [1]
    assert torch.allclose(target["boxes"], torch.tensor([[21 / 60, 14 / 40, 30 / 60, 20 / 40]]))
    image, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["size"].tolist() == [64, 64]


def test_sizes_missing_from_the_file_are_read_from_the_images(tmp_path) -> None:
    _write_coco(str(tmp_path), [{"id": 3, "file_name": "a.jpg", "height": 30, "width": 20}], [])
    path = tmp_path / "annotations" / "instances_val2017.json"
    payload = json.loads(path.read_text())
    del payload["images"][0]["height"], payload["images"][0]["width"]
    path.write_text(json.dumps(payload))
    info = build_dataset(_data_cfg(str(tmp_path)), "val").coco.imgs[3]
    assert (info["height"], info["width"]) == (30, 20)


def test_auto_splits_pick_the_only_train_and_val_files(tmp_path) -> None:
    images = [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}]
    _write_coco(str(tmp_path), images, [], split="train_mine")
    _write_coco(str(tmp_path), images, [], split="val_mine")
    assert build_dataset(_data_cfg(str(tmp_path)), "train").split == "train_mine"
    assert build_dataset(_data_cfg(str(tmp_path)), "val").split == "val_mine"


def test_missing_annotation_file_is_named(tmp_path) -> None:
    os.makedirs(tmp_path / "val2017")
    with pytest.raises(DatasetError, match="instances_val2017.json does not exist"):
        build_dataset(_data_cfg(str(tmp_path), format="coco"), "val")


def test_unreadable_image_is_named(tmp_path) -> None:
    images = [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 20}]
    _write_coco(str(tmp_path), images, [])
    with open(tmp_path / "val2017" / "a.jpg", "wb") as f:
        f.write(b"not a jpeg at all")
    dataset = build_dataset(_data_cfg(str(tmp_path)), "val")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.jpg \(image id 1\)"):
        dataset[0]


# --- CVAT / Datumaro "COCO 1.0" exports: annotations/instances_<subset>.json, images/<subset>/ ----------------------


def _write_cvat(root: str, subsets: dict[str, str]) -> str:
    """CVAT's export: ``annotations/instances_<subset>.json`` and ``images/<subset>/`` per subset (split -> name)."""
    for split, subset in subsets.items():
        payload = coco_payload(split, os.path.join(root, "images", subset))
        write_json(os.path.join(root, "annotations", f"instances_{subset}.json"), payload)
    return root


def test_cvat_train_and_val_subsets_are_read_from_images_folders(tmp_path) -> None:
    root = _write_cvat(str(tmp_path / "cvat"), {"train": "train", "val": "val"})
    for which, count in (("train", 3), ("val", 2)):
        data = read_split(DataConfig(root=root), which)
        assert (data.split, data.image_root, len(data.coco["images"])) == (which, f"{root}/images/{which}", count)
    # the override that worked before still does; an exact train / val wins over other *train* files
    cfg = DataConfig(root=root, train_ann="annotations/instances_train.json", train_split="images/train")
    assert read_split(cfg, "train").image_root == f"{root}/images/train"
    shutil.copy(f"{root}/annotations/instances_train.json", f"{root}/annotations/instances_train_extra.json")
    assert read_split(DataConfig(root=root), "train").split == "train"
    # root/<split>/ is read where it exists
    shutil.copytree(f"{root}/images/val", f"{root}/val")
    assert read_split(DataConfig(root=root), "val").image_root == f"{root}/val"


def test_cvat_image_folder_missing_names_both_places_without_the_coco_download(tmp_path) -> None:
    root = _write_cvat(str(tmp_path / "cvat"), {"train": "train", "val": "val"})
    shutil.move(f"{root}/images/val", f"{root}/pictures")
    with pytest.raises(DatasetError) as caught:
        read_split(DataConfig(root=root), "val")
    message = str(caught.value)
    assert message.startswith(f"image folder {root}/val does not exist: the file_name entries of ")
    assert f"({root}/val, or {root}/images/val where that does not exist); set data.val_split to the" in message
    assert "cocodataset.org" not in message


def test_cvat_single_subset_lists_the_annotation_files_and_the_overrides(tmp_path) -> None:
    root = _write_cvat(str(tmp_path / "cvat"), {"train": "default"})
    with pytest.raises(DatasetError) as caught:
        read_split(DataConfig(root=root), "train")
    message = str(caught.value)
    assert message == (
        f"annotation file {root}/annotations/instances_train2017.json does not exist: no train split "
        "(data.train_split=auto reads instances_train2017.json, else instances_train.json, else the only "
        f"instances_*train*.json); {root}/annotations holds instances_default.json: read it with "
        "data.train_split=default data.val_split=default (one split for both, so validation scores the training "
        "images); the images of split S are read from data.root/S/ or data.root/images/S/"
    )
    cfg = DataConfig(root=root, train_split="default", val_split="default")
    assert len(read_split(cfg, "train").coco["images"]) == len(read_split(cfg, "val").coco["images"]) == 3
    # two subsets of other names: both listed, one example each; no download hint while any is there
    _write_cvat(root, {"val": "holdout"})
    with pytest.raises(DatasetError, match=r"holds instances_default.json, instances_holdout.json: read them with "):
        read_split(DataConfig(root=root), "val")
    # the COCO 2017 download is named only when the annotations folder holds no instances_*.json
    for name in ("default", "holdout"):
        os.remove(f"{root}/annotations/instances_{name}.json")
    with pytest.raises(DatasetError, match=r"instances_train2017.json does not exist: .*cocodataset.org/#download"):
        read_split(DataConfig(root=root, format="coco"), "train")


# --- annotations: which condition failed; boxes from segmentations ---------------------------------------------------


def _edit_val(root: str, edit) -> str:
    path = os.path.join(root, "annotations", "instances_val2017.json")
    with open(path) as f:
        payload = json.load(f)
    edit(payload)
    write_json(path, payload)
    return path


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"image_id": 999}, "its image_id 999 is not among the images of the file; "),
        ({"bbox": []}, "its bbox is empty and it has no segmentation to take it from; "),
        ({"bbox": [], "segmentation": []}, "its bbox is empty and it has no segmentation to take it from; "),
        ({"bbox": [1, 2, 3]}, "its bbox [1, 2, 3] is not [x, y, w, h], four numbers; "),
        ({"category_id": "1"}, 'its category_id "1" is not an integer; '),
        ({"bbox": [], "segmentation": [[1, 2, 3]]}, "its bbox is empty and its segmentation [[1, 2, 3]] is neither "),
        (  # run lengths that do not fill the mask's 5 x 6 pixels
            {"bbox": [], "segmentation": {"size": [5, 6], "counts": [5]}},
            'its bbox is empty and its segmentation {"size": [5, 6], "counts": [5]} is neither polygons '
            '[[x1, y1, x2, y2, ...], ...] of finite numbers nor RLE {"size": [h, w], "counts": ...}; ',
        ),
    ],
)
def test_malformed_annotation_says_which_condition_failed(tmp_path, changes: dict, reason: str) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = _edit_val(root, lambda p: p["annotations"][0].update(changes))
    with pytest.raises(DatasetError) as caught:
        read_split(DataConfig(root=root), "val")
    assert str(caught.value).startswith(f"annotation file {path} is malformed: annotation id 1: {reason}")
    assert "an annotation needs an 'id', a 'bbox' [x, y, w, h] in pixels (or a 'segmentation'" in str(caught.value)


def test_annotation_without_an_id_says_so(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = _edit_val(root, lambda p: p["annotations"][0].pop("id"))
    with pytest.raises(DatasetError, match=re.escape(f"{path} is malformed: annotation id ?: it has no 'id'; ")):
        read_split(DataConfig(root=root), "val")


def test_empty_boxes_are_taken_from_polygons_and_rle(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))  # val: d.jpg 60 x 50 (1 box), e.jpg 48 x 64 (2 boxes)
    mask = np.zeros((64, 48), dtype=np.uint8)
    mask[40:52, 30:40] = 1  # rows y 40..51, columns x 30..39: box [30, 40, 10, 12]
    compressed = mask_utils.encode(np.asfortranarray(mask))
    compressed["counts"] = compressed["counts"].decode("ascii")  # as JSON holds it
    # column-major run lengths, starting with a run of 0s (the mask's first pixel is one)
    runs = [len(list(run)) for _, run in itertools.groupby(mask.flatten(order="F"))]
    uncompressed = {"size": [64, 48], "counts": runs}

    def edit(payload: dict) -> None:
        first, second, third = payload["annotations"]
        first["bbox"] = []
        first["segmentation"] = [[10.5, 10, 40, 10, 40, 30, 10.5, 30], [12, 8, 14, 9, 13, 11]]
        del second["bbox"]
        second["segmentation"] = uncompressed
        third["bbox"] = None
        third["segmentation"] = compressed

    _edit_val(root, edit)
    data = read_split(DataConfig(root=root), "val")
    boxes = [ann["bbox"] for ann in data.coco["annotations"]]
    assert boxes == [[10.5, 8, 29.5, 22], [30.0, 40.0, 10.0, 12.0], [30.0, 40.0, 10.0, 12.0]]
    assert "3 box(es) taken from the segmentation (annotations with an empty or missing bbox)" in data.notes


# --- one image file under two image ids; file names in another Unicode normalisation -------------------------------


@pytest.mark.parametrize("name", ["d.jpg", "./d.jpg"])
def test_an_image_file_listed_under_two_ids_is_refused(tmp_path, name: str) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = _edit_val(root, lambda p: p["images"].append({**p["images"][0], "id": 7, "file_name": name}))
    with pytest.raises(DatasetError) as caught:
        read_split(DataConfig(root=root), "val")
    assert str(caught.value) == (
        f"annotation file {path}: image file {name} is listed twice, as image id 1 (1 annotation(s)) and image id 7 "
        "(0 annotation(s)); one copy would train as an image without the other's boxes: merge their annotations "
        "onto one image id and remove the other entry"
    )


def test_file_names_in_another_unicode_normalisation_read_the_file_on_disk(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    nfc, nfd = (unicodedata.normalize(form, "Zoë/café.jpg") for form in ("NFC", "NFD"))
    assert nfc != nfd
    os.makedirs(os.path.join(root, "val2017", nfd.split("/")[0]))
    os.rename(os.path.join(root, "val2017", "d.jpg"), os.path.join(root, "val2017", nfd))  # as macOS zips write it
    _edit_val(root, lambda p: p["images"][0].update(file_name=nfc))
    dataset = build_dataset(_data_cfg(root), "val")
    assert dataset.coco.imgs[1]["file_name"] == nfd and dataset[0][0].shape == (3, 64, 76)
    note = f"1 file_name(s) read as the file on disk whose name differs only in Unicode normalisation, e.g. {nfc!r}"
    assert note in dataset.data.notes
    # NFC and NFD entries of one file are one file listed twice
    _edit_val(root, lambda p: p["images"].append({**p["images"][0], "id": 7, "file_name": nfd}))
    with pytest.raises(DatasetError, match="is listed twice, as image id 1"):
        read_split(DataConfig(root=root), "val")
