"""Shared by the data tests: one small detection data set written in each of the four layouts."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import yaml
from PIL import Image

CLASSES = ["cat", "dog"]  # alphabetical, so VOC's sorted ids and YOLO's order agree: cat 1, dog 2
# split -> [(stem, width, height, [(class, [x, y, w, h] integer pixels), ...])]
SPLITS: dict[str, list[tuple[str, int, int, list[tuple[str, list[int]]]]]] = {
    "train": [
        ("a", 64, 48, [("cat", [5, 6, 20, 15]), ("dog", [30, 10, 25, 30])]),
        ("b", 50, 70, [("dog", [0, 0, 50, 40])]),
        ("c", 40, 40, []),
    ],
    "val": [
        ("d", 60, 50, [("cat", [10, 10, 30, 20])]),
        ("e", 48, 64, [("dog", [4, 4, 20, 30]), ("cat", [30, 40, 10, 12])]),
    ],
}
COLOURS = {"cat": (40, 40, 220), "dog": (40, 200, 40)}  # BGR


def write_image(path: str, width: int, height: int, boxes: list[tuple[str, list[int]]]) -> None:
    """A grey JPEG with each box filled in its class's colour."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture = np.full((height, width, 3), 120, dtype=np.uint8)
    for name, (x, y, w, h) in boxes:
        picture[y : y + h, x : x + w] = COLOURS[name]
    assert cv2.imwrite(path, picture)


def write_rotated_jpeg(path: str, upright: np.ndarray, orientation: int = 6) -> None:
    """Stores ``upright`` (H, W, 3) RGB turned a quarter anticlockwise, with the EXIF orientation (6) that turns it
    back: the file holds a W x H picture (width x height) that is shown, and read, H x W."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = stored.getexif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif)


def coco_payload(split: str, folder: str, supercategory: bool = False) -> dict:
    """The split as a COCO dict (category ids 1..K), its images written into ``folder``."""
    images, annotations = [], []
    for image_id, (stem, width, height, boxes) in enumerate(SPLITS[split], start=1):
        write_image(os.path.join(folder, f"{stem}.jpg"), width, height, boxes)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": width, "height": height})
        for name, box in boxes:
            ann_id = len(annotations) + 1
            category = CLASSES.index(name) + 1
            ann = {"id": ann_id, "image_id": image_id, "category_id": category, "bbox": box, "iscrowd": 0}
            annotations.append({**ann, "area": box[2] * box[3]})
    parent = "animals" if supercategory else "none"
    categories = [{"id": i + 1, "name": n, "supercategory": parent} for i, n in enumerate(CLASSES)]
    if supercategory:  # what Roboflow exports: an unused category 0 above the others
        categories.insert(0, {"id": 0, "name": "animals", "supercategory": "none"})
    return {"info": {}, "images": images, "annotations": annotations, "categories": categories}


def replace_in_file(path: str, old: str, new: str) -> None:
    """Edits a text file in place: ``old`` (which must be there) becomes ``new``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert old in text, f"{old!r} not in {path}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)


def write_coco(root: str) -> str:
    for split, name in (("train", "train2017"), ("val", "val2017")):
        payload = coco_payload(split, os.path.join(root, name))
        write_json(os.path.join(root, "annotations", f"instances_{name}.json"), payload)
    return root


def write_roboflow(root: str) -> str:
    for split, name in (("train", "train"), ("val", "valid")):
        folder = os.path.join(root, name)
        write_json(os.path.join(folder, "_annotations.coco.json"), coco_payload(split, folder, supercategory=True))
    return root


def yolo_line(name: str, box: list[int], width: int, height: int) -> str:
    x, y, w, h = box
    values = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
    return f"{CLASSES.index(name)} " + " ".join(f"{v:.8f}" for v in values)


def write_yolo(root: str, names: object = CLASSES) -> str:
    for split in ("train", "val"):
        for stem, width, height, boxes in SPLITS[split]:
            write_image(os.path.join(root, "images", split, f"{stem}.jpg"), width, height, boxes)
            if not boxes:
                continue  # no label file: no object
            os.makedirs(os.path.join(root, "labels", split), exist_ok=True)
            with open(os.path.join(root, "labels", split, f"{stem}.txt"), "w") as f:
                f.write("".join(yolo_line(n, b, width, height) + "\n" for n, b in boxes))
    with open(os.path.join(root, "data.yaml"), "w") as f:
        yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val", "names": names}, f)
    return root


def voc_xml(stem: str, width: int, height: int, boxes: list[tuple[str, list[int]]], difficult: int = -1) -> str:
    """VOC XML with 1-based inclusive pixel boxes: [x, y, w, h] -> xmin x+1, xmax x+w; object ``difficult`` marked."""
    objects = "".join(
        f"<object><name>{name}</name><difficult>{int(i == difficult)}</difficult><bndbox><xmin>{x + 1}</xmin>"
        f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
        for i, (name, (x, y, w, h)) in enumerate(boxes)
    )
    size = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation><filename>{stem}.jpg</filename>{size}{objects}</annotation>"


def write_voc(root: str) -> str:
    for split in ("train", "val"):
        for stem, width, height, boxes in SPLITS[split]:
            write_image(os.path.join(root, "JPEGImages", f"{stem}.jpg"), width, height, boxes)
            os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
            with open(os.path.join(root, "Annotations", f"{stem}.xml"), "w") as f:
                f.write(voc_xml(stem, width, height, boxes))
        os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(f"{stem}\n" for stem, *_ in SPLITS[split]))
    return root


def write_roboflow_voc(root: str) -> str:
    """Roboflow's Pascal VOC export: train/ and valid/, each with its images and one XML per image."""
    for split, folder in (("train", "train"), ("val", "valid")):
        for stem, width, height, boxes in SPLITS[split]:
            write_image(os.path.join(root, folder, f"{stem}.jpg"), width, height, boxes)
            with open(os.path.join(root, folder, f"{stem}.xml"), "w") as f:
                f.write(voc_xml(stem, width, height, boxes))
    with open(os.path.join(root, "README.roboflow.txt"), "w") as f:
        f.write("exported from roboflow.com\n")
    return root


WRITERS = {
    "coco": write_coco,
    "roboflow": write_roboflow,
    "yolo": write_yolo,
    "voc": write_voc,
    "roboflow-voc": write_roboflow_voc,
}
