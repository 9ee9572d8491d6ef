"""The COCO layout as before the move: images read, images without annotations kept, files named in errors."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from deformable.data import DatasetError, build_dataset
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
