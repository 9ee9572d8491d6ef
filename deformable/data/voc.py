"""Pascal VOC XML in two layouts: ``voc``, the original (``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt``, one id a line), and ``roboflow-voc``, one folder per split holding its images and one
``<stem>.xml`` per image (Roboflow's Pascal VOC export; LabelImg's folders).

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
        difficult = (node.findtext("difficult") or "0").strip().lower() in ("1", "true")
        record.objects.append(VocObject(name=name, box=box, difficult=difficult))
    return record


@dataclass
class VocEntry:
    """One annotated image of a split: where it is listed (for messages), its id (file stem), its record and the XML
    file it was read from."""

    where: str  # "<split list> line N" or the XML file
    image_id: str
    record: VocRecord
    xml: str


def split_folder(root: str, split: str) -> str:
    """The ``roboflow-voc`` folder of ``split``: images and their XML side by side."""
    return os.path.join(root, split)


def split_source(root: str, split: str, layout: str) -> str:
    """The file or folder that lists ``split``: the ImageSets list (``voc``) or the split's folder."""
    return split_file(root, split) if layout == "voc" else split_folder(root, split)


def has_split(root: str, split: str, layout: str) -> bool:
    """Whether ``split`` exists in ``layout``: its ImageSets list (``voc``), or its folder with an XML in it."""
    if layout == "voc":
        return os.path.isfile(split_file(root, split))
    folder = split_folder(root, split)
    return os.path.isdir(folder) and any(name.lower().endswith(".xml") for name in os.listdir(folder))


def _read_list(root: str, split: str) -> list[VocEntry]:
    entries = []
    for number, image_id in split_ids(root, split):
        xml = os.path.join(root, "Annotations", f"{image_id}.xml")
        where = f"{split_file(root, split)} line {number}"
        if not os.path.isfile(xml):
            raise DatasetError(f"{where}: {image_id} has no annotation file {xml}")
        entries.append(VocEntry(where, image_id, parse_annotation(xml), xml))
    return entries


def _read_folder(root: str, split: str) -> list[VocEntry]:
    folder = split_folder(root, split)
    if not os.path.isdir(folder):
        there = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        raise DatasetError(
            f"the split folder {folder} does not exist (folders found: {', '.join(there) or 'none'}); set "
            "data.train_split / data.val_split to one of them"
        )
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".xml") and not n.startswith("."))
    paths = [os.path.join(folder, n) for n in names]
    return [VocEntry(path, n[:-4], parse_annotation(path), path) for n, path in zip(names, paths, strict=True)]


def read_entries(root: str, split: str, layout: str = "voc") -> list[VocEntry]:
    """Every annotated image of ``split`` in ``layout`` (``voc`` or ``roboflow-voc``), parsed."""
    return _read_list(root, split) if layout == "voc" else _read_folder(root, split)


def _image_name(folder: str, entry: VocEntry) -> str | None:
    """The image's file name in ``folder``: ``<id>.jpg`` (or another extension), else the XML's filename."""
    for name in [entry.image_id + ext for ext in IMAGE_EXTENSIONS] + [entry.record.filename]:
        if name and os.path.isfile(os.path.join(folder, name)):
            return name
    return None


def voc_class_names(
    root: str, splits: list[str], read: dict[str, list[VocEntry]] | None = None, layout: str = "voc"
) -> list[str]:
    """The object names of the listed ``splits`` (those that exist), sorted: class ``i`` of it is category id
    ``i + 1``. ``read`` holds splits already parsed (split -> :func:`read_entries`)."""
    names: set[str] = set()
    for split in splits:
        if (read and split in read) or has_split(root, split, layout):
            entries = read[split] if read and split in read else read_entries(root, split, layout)
            names |= {o.name for entry in entries for o in entry.record.objects}
    return sorted(names)


def read_voc(root: str, split: str, class_splits: list[str], layout: str = "voc") -> SplitData:
    """The split ``split`` of ``layout`` (``voc`` or ``roboflow-voc``) as a COCO dict; class ids come from the
    objects of ``split`` and of ``class_splits`` (those that exist)."""
    entries = read_entries(root, split, layout)
    names = voc_class_names(root, [split, *class_splits], read={split: entries}, layout=layout)
    ids = {name: i for i, name in enumerate(names, start=1)}
    image_root = os.path.join(root, "JPEGImages") if layout == "voc" else split_folder(root, split)
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i, "name": name} for name, i in ids.items()]
    size_sources: dict[int, str] = {}  # the XML whose <size> gives an image's size (messages name it on a mismatch)
    for image_number, entry in enumerate(entries, start=1):
        record = entry.record
        name = _image_name(image_root, entry)
        if name is None:
            raise DatasetError(
                f"{entry.where}: no image for {entry.image_id} in {image_root} (looked for {entry.image_id}.jpg and "
                f"{record.filename or 'no'} <filename>)"
            )
        height, width = record.height, record.width
        if height <= 0 or width <= 0:
            height, width = image_size(os.path.join(image_root, name))
        else:
            size_sources[image_number] = f"{entry.xml} (<size>)"
        coco["images"].append({"id": image_number, "file_name": name, "height": height, "width": width})
        for obj in record.objects:
            xmin, ymin, xmax, ymax = obj.box
            ann = {"id": len(coco["annotations"]) + 1, "image_id": image_number, "category_id": ids[obj.name]}
            bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            coco["annotations"].append({**ann, "bbox": bbox, "iscrowd": int(obj.difficult)})
    data = SplitData(layout, split, image_root, coco, split_source(root, split, layout), size_sources)
    if layout != "voc":
        unlabelled = _images_without_xml(image_root, coco["images"])
        if unlabelled:
            # Left out, not kept as background: an image LabelImg has no XML for may simply not be labelled yet.
            data.notes.append(
                f"{len(unlabelled)} image(s) without an XML file left out (e.g. {unlabelled[0]}; an image with no "
                "object needs an XML without <object>)"
            )
    return finish_split(data)


def _images_without_xml(folder: str, images: list[dict[str, Any]]) -> list[str]:
    """The image files in a ``roboflow-voc`` split folder that no XML of ``images`` named."""
    used = {info["file_name"] for info in images}
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and n not in used)
