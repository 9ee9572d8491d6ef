"""pycocotools COCOeval on splits read from YOLO and VOC folders: perfect detections score AP 1.0, and a detection
on a VOC difficult box is neither a hit nor a false positive."""

from __future__ import annotations

import os

import pytest
from _data_utils import SPLITS, voc_xml, write_voc, write_yolo

from deformable.data import build_dataset
from deformable.data.coco_eval import coco_metrics
from models.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _perfect(dataset) -> list[dict]:
    """One detection per non-crowd ground-truth box, exactly on it."""
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 0.9}
        for a in dataset.coco.dataset["annotations"]
        if not a["iscrowd"]
    ]


@pytest.mark.parametrize("writer", [write_yolo, write_voc])
def test_perfect_detections_score_ap_one(writer, tmp_path) -> None:
    dataset = build_dataset(DataConfig(root=writer(str(tmp_path / "d"))), "val", transforms=False)
    metrics = coco_metrics(dataset.coco, _perfect(dataset), dataset.ids)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_detection_on_a_difficult_box_is_ignored(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    _, width, height, boxes = SPLITS["val"][1]
    boxes = [*boxes, ("cat", [2, 40, 12, 14])]
    with open(os.path.join(root, "Annotations", "e.xml"), "w") as f:
        f.write(voc_xml("e", width, height, boxes, difficult=2))
    dataset = build_dataset(DataConfig(root=root), "val", transforms=False)
    (difficult,) = [a for a in dataset.coco.dataset["annotations"] if a["iscrowd"]]
    perfect = _perfect(dataset)
    on_difficult = {"image_id": difficult["image_id"], "category_id": 1, "bbox": difficult["bbox"], "score": 0.95}
    metrics = coco_metrics(dataset.coco, [*perfect, on_difficult], dataset.ids)
    assert metrics["AP"] == pytest.approx(1.0)
    elsewhere = {**on_difficult, "bbox": [20.0, 45.0, 8.0, 8.0]}  # the same score on nothing: a false positive
    assert coco_metrics(dataset.coco, [*perfect, elsewhere], dataset.ids)["AP"] < 0.9
