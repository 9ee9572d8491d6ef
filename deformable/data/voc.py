"""Pascal VOC: ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and ``ImageSets/Main/<split>.txt`` (one id a line).

Coordinates: VOC numbers pixels from 1 and ``xmin..xmax`` are the first and last pixel columns a box covers. In the
COCO dict's continuous coordinates (the image spans [0, width]) that box is ``[xmin - 1, xmax]``, so its COCO
``bbox`` is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (the VOC devkit's and detectron2's reading).
Classes: the object names of the train and val splits (``data.train_split``, ``data.val_split``), sorted
alphabetically, become category ids 1..K, the same whichever split is read. ``difficult`` objects get
``iscrowd: 1``: training ignores them and evaluation neither counts them nor penalises detections on them.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from .decode import image_size
from .errors import DatasetError
from .split import IMAGE_EXTENSIONS, SplitData, finish_split


@dataclass
class VocObject:
    name: str
    box: list[float]  # xmin, ymin, xmax, ymax as written (1-based inclusive pixels)
    difficult: bool


@dataclass
class VocRecord:
    """One ``Annotations/<id>.xml``: the image's ``filename`` and ``size`` (0 when absent) and its objects."""

    filename: str
    width: int
    height: int
    objects: list[VocObject] = field(default_factory=list)


def split_file(root: str, split: str) -> str:
    return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def split_ids(root: str, split: str) -> list[tuple[int, str]]:
    """``(line number, image id)`` of each non-empty line of ``ImageSets/Main/<split>.txt``."""
    path = split_file(root, split)
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        there = sorted(n[:-4] for n in os.listdir(folder) if n.endswith(".txt")) if os.path.isdir(folder) else []
        if there:
            raise DatasetError(
                f"the VOC split file {path} does not exist (splits found: {', '.join(there)}); set "
                "data.train_split / data.val_split to one of them"
            )
        raise DatasetError(
            f"the VOC split file {path} does not exist, nor does any other in {folder}: VOC lists each split's "
            "images in ImageSets/Main/<split>.txt, one image id (an Annotations/<id>.xml name without .xml) a "
            "line; write train.txt and val.txt there"
        )
    with open(path, encoding="utf-8-sig") as f:
        return [(n, line.split()[0]) for n, line in enumerate(f, start=1) if line.strip()]


def _number(node: ET.Element, tag: str, path: str) -> float:
    text = node.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: <{tag}> must be a number, got {text!r}") from None


def parse_annotation(path: str) -> VocRecord:
    """Reads one VOC XML file; malformed XML or an object without ``name`` / ``bndbox`` is a DatasetError."""
    try:
        top = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, column = exc.position
        raise DatasetError(f"malformed XML in {path} (line {line}, column {column}): {exc}") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    size = top.find("size")
    width = int(_number(size, "width", path)) if size is not None and size.findtext("width") else 0
    height = int(_number(size, "height", path)) if size is not None and size.findtext("height") else 0
    record = VocRecord(filename=(top.findtext("filename") or "").strip(), width=width, height=height)
    for i, node in enumerate(top.iter("object"), start=1):
        name, bndbox = (node.findtext("name") or "").strip(), node.find("bndbox")
        if not name or bndbox is None:
            raise DatasetError(f"{path}: object {i} needs a <name> and a <bndbox>")
        box = [_number(bndbox, tag, path) for tag in ("xmin", "ymin", "xmax", "ymax")]
        difficult = (node.findtext("difficult") or "0").strip() in ("1", "true")
        record.objects.append(VocObject(name=name, box=box, difficult=difficult))
    return record


def _image_name(root: str, image_id: str, record: VocRecord) -> str | None:
    """The image's file name in ``JPEGImages``: ``<id>.jpg`` (or another extension), else the XML's filename."""
    folder = os.path.join(root, "JPEGImages")
    for name in [image_id + ext for ext in IMAGE_EXTENSIONS] + [record.filename]:
        if name and os.path.isfile(os.path.join(folder, name)):
            return name
    return None


def _read_list(root: str, split: str) -> list[tuple[int, str, VocRecord]]:
    records = []
    for number, image_id in split_ids(root, split):
        xml = os.path.join(root, "Annotations", f"{image_id}.xml")
        if not os.path.isfile(xml):
            raise DatasetError(f"{split_file(root, split)} line {number}: {image_id} has no annotation file {xml}")
        records.append((number, image_id, parse_annotation(xml)))
    return records


def voc_class_names(root: str, splits: list[str], read: dict[str, list] | None = None) -> list[str]:
    """The object names of the listed ``splits`` (those whose list exists), sorted: class ``i`` of it is category id
    ``i + 1``. ``read`` holds splits already parsed (split -> :func:`_read_list`)."""
    names: set[str] = set()
    for split in splits:
        if (read and split in read) or os.path.isfile(split_file(root, split)):
            records = read[split] if read and split in read else _read_list(root, split)
            names |= {o.name for _, _, record in records for o in record.objects}
    return sorted(names)


def read_voc(root: str, split: str, class_splits: list[str]) -> SplitData:
    """The split ``split`` as a COCO dict; class ids come from the objects of ``split`` and of ``class_splits``
    (those whose list exists)."""
    records = _read_list(root, split)
    names = voc_class_names(root, [split, *class_splits], read={split: records})
    ids = {name: i for i, name in enumerate(names, start=1)}
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i, "name": name} for name, i in ids.items()]
    for image_number, (number, image_id, record) in enumerate(records, start=1):
        name = _image_name(root, image_id, record)
        if name is None:
            raise DatasetError(
                f"{split_file(root, split)} line {number}: no image for {image_id} in "
                f"{os.path.join(root, 'JPEGImages')} (looked for {image_id}.jpg and {record.filename or 'no'} "
                "<filename>)"
            )
        height, width = record.height, record.width
        if height <= 0 or width <= 0:
            height, width = image_size(os.path.join(root, "JPEGImages", name))
        coco["images"].append({"id": image_number, "file_name": name, "height": height, "width": width})
        for obj in record.objects:
            xmin, ymin, xmax, ymax = obj.box
            ann = {"id": len(coco["annotations"]) + 1, "image_id": image_number, "category_id": ids[obj.name]}
            bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            coco["annotations"].append({**ann, "bbox": bbox, "iscrowd": int(obj.difficult)})
    data = SplitData("voc", split, os.path.join(root, "JPEGImages"), coco, source=split_file(root, split))
    return finish_split(data)
