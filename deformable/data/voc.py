"""Pascal VOC XML in two layouts: ``voc``, the original (``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt``, one id a line), and ``roboflow-voc``, one folder per split holding its images and one
``<stem>.xml`` per image (Roboflow's Pascal VOC export; LabelImg's folders).

Coordinates: VOC numbers pixels from 1 and ``xmin..xmax`` are the first and last pixel columns a box covers. In the
COCO dict's continuous coordinates (the image spans [0, width]) that box is ``[xmin - 1, xmax]``, so its COCO
``bbox`` is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (the VOC devkit's and detectron2's reading).
Classes: the object names of the train and val splits (``data.train_split``, ``data.val_split``), sorted
alphabetically, become category ids 1..K, the same whichever split is read (names that differ only in case stay
apart, with a warning among the split's notes). ``difficult`` objects get ``iscrowd: 1``: training ignores them and
evaluation neither counts them nor penalises detections on them.
"""

from __future__ import annotations

import math
import os
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from .errors import DatasetError, read_text
from .scan import header_sizes
from .split import IMAGE_EXTENSIONS, SplitData, finish_split, is_hidden, name_on_disk


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
    lines = read_text(path).splitlines()
    return [(n, _line_id(root, line)) for n, line in enumerate(lines, start=1) if line.strip()]


def _line_id(root: str, line: str) -> str:
    """The image id of a split list's line: its first field (a class list's lines are ``<id> <1|0|-1>``), or the
    whole line where ``Annotations/<line>.xml`` exists (an id with a space in it, as other tools write them)."""
    whole = line.strip()
    if " " in whole and os.path.isfile(os.path.join(root, "Annotations", whole + ".xml")):
        return whole
    return whole.split()[0]


def _number(node: ET.Element, tag: str, path: str, what: str) -> float:
    """The finite number in ``node``'s ``<tag>``; errors name the XML file ``path`` and ``what`` holds the tag."""
    text = node.findtext(tag)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: <{tag}> must be a number, got {text!r} ({what})") from None
    if not math.isfinite(value):  # float() reads "nan" and "inf", which would reach the boxes and sizes unnoticed
        raise DatasetError(f"{path}: <{tag}> must be a finite number, got {text!r} ({what})")
    return value


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
    width = int(_number(size, "width", path, "<size>")) if size is not None and size.findtext("width") else 0
    height = int(_number(size, "height", path, "<size>")) if size is not None and size.findtext("height") else 0
    record = VocRecord(filename=(top.findtext("filename") or "").strip(), width=width, height=height)
    for i, node in enumerate(top.iter("object"), start=1):
        name, bndbox = (node.findtext("name") or "").strip(), node.find("bndbox")
        if not name or bndbox is None:
            raise DatasetError(f"{path}: object {i} needs a <name> and a <bndbox>")
        box = [_number(bndbox, tag, path, f"object {i} {name!r}") for tag in ("xmin", "ymin", "xmax", "ymax")]
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
    return os.path.isdir(folder) and any(n.lower().endswith(".xml") and not is_hidden(n) for n in os.listdir(folder))


def _read_list(root: str, split: str) -> list[VocEntry]:
    entries = []
    listings: dict[str, dict[str, str]] = {}
    for number, image_id in split_ids(root, split):
        xml = os.path.join(root, "Annotations", f"{image_id}.xml")
        where = f"{split_file(root, split)} line {number}"
        if not os.path.isfile(xml) and (on_disk := name_on_disk(os.path.dirname(xml), f"{image_id}.xml", listings)):
            xml = os.path.join(root, "Annotations", on_disk)  # the id's name in another Unicode normalisation
        if not os.path.isfile(xml):
            stem, ext = os.path.splitext(image_id)
            named = ext and os.path.isfile(os.path.join(root, "Annotations", f"{stem}.xml"))
            hint = f" (the list names images without extension: {stem}, not {image_id})" if named else ""
            raise DatasetError(f"{where}: {image_id} has no annotation file {xml}{hint}")
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
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".xml") and not is_hidden(n))
    paths = [os.path.join(folder, n) for n in names]
    return [VocEntry(path, n[:-4], parse_annotation(path), path) for n, path in zip(names, paths, strict=True)]


def read_entries(root: str, split: str, layout: str = "voc") -> list[VocEntry]:
    """Every annotated image of ``split`` in ``layout`` (``voc`` or ``roboflow-voc``), parsed."""
    return _read_list(root, split) if layout == "voc" else _read_folder(root, split)


class _ImageFinder:
    """Finds the image of each XML in one folder: ``<id>.jpg`` (or another extension), else the XML's
    ``<filename>``, else ``<id>`` with an image extension in any case (a camera's ``PHOTO.JPG`` beside ``PHOTO.xml``,
    which a case-sensitive file system does not find as ``PHOTO.jpg``) and its name in either Unicode normalisation
    (NFC in the list file, NFD on disk, as macOS zips write names). The folder is listed once, and only when an
    image is not found by name."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._by_stem: dict[str, str] | None = None

    def find(self, entry: VocEntry) -> str | None:
        """The image's file name in the folder, None when there is none."""
        for name in [entry.image_id + ext for ext in IMAGE_EXTENSIONS] + [entry.record.filename]:
            if name and os.path.isfile(os.path.join(self.folder, name)):
                return name
        if self._by_stem is None:
            self._by_stem = {}
            for name in _image_files(self.folder):
                self._by_stem.setdefault(unicodedata.normalize("NFC", os.path.splitext(name)[0]), name)
        found = self._by_stem.get(unicodedata.normalize("NFC", entry.image_id))
        if found is None and entry.record.filename:
            found = name_on_disk(self.folder, entry.record.filename)
        return found


def _image_files(folder: str) -> list[str]:
    """The image files of ``folder`` (by extension in any case, hidden ones left out), sorted."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not is_hidden(n))


def _class_files(root: str, splits: list[str], read: dict[str, list[VocEntry]] | None, layout: str) -> dict[str, str]:
    """Object name -> the first XML file with an object of that name, over the listed ``splits`` (those that exist);
    ``read`` holds splits already parsed (split -> :func:`read_entries`)."""
    files: dict[str, str] = {}
    for split in splits:
        if (read and split in read) or has_split(root, split, layout):
            entries = read[split] if read and split in read else read_entries(root, split, layout)
            for entry in entries:
                for obj in entry.record.objects:
                    files.setdefault(obj.name, entry.xml)
    return files


def voc_class_names(
    root: str, splits: list[str], read: dict[str, list[VocEntry]] | None = None, layout: str = "voc"
) -> list[str]:
    """The object names of the listed ``splits`` (those that exist), sorted: class ``i`` of it is category id
    ``i + 1``. ``read`` holds splits already parsed (split -> :func:`read_entries`)."""
    return sorted(_class_files(root, splits, read, layout))


def _case_warnings(class_files: dict[str, str]) -> list[str]:
    """A warning per group of class names that differ only in case (``Dog``, ``dog``): they stay separate classes
    (names are the data's), but are more often one class labelled twice, which splits its boxes in two."""
    groups: dict[str, list[str]] = {}
    for name in sorted(class_files):
        groups.setdefault(name.casefold(), []).append(name)
    return [
        "warning: the class names "
        + " and ".join(f"{name!r} (e.g. {class_files[name]})" for name in group)
        + " differ only in case and are read as separate classes; rename them alike if they are one class"
        for group in groups.values()
        if len(group) > 1
    ]


def read_voc(root: str, split: str, class_splits: list[str], layout: str = "voc") -> SplitData:
    """The split ``split`` of ``layout`` (``voc`` or ``roboflow-voc``) as a COCO dict; class ids come from the
    objects of ``split`` and of ``class_splits`` (those that exist)."""
    entries = read_entries(root, split, layout)
    class_files = _class_files(root, [split, *class_splits], {split: entries}, layout)
    ids = {name: i for i, name in enumerate(sorted(class_files), start=1)}
    image_root = os.path.join(root, "JPEGImages") if layout == "voc" else split_folder(root, split)
    finder = _ImageFinder(image_root)
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": []}
    coco["categories"] = [{"id": i, "name": name} for name, i in ids.items()]
    size_sources: dict[int, str] = {}  # the XML whose <size> gives an image's size (messages name it on a mismatch)
    names = [_image_name(finder, entry) for entry in entries]
    sizes = _image_sizes(entries, names, image_root, split_source(root, split, layout))
    for image_number, (entry, name, (height, width)) in enumerate(zip(entries, names, sizes, strict=True), start=1):
        record = entry.record
        if _has_size(record):
            size_sources[image_number] = f"{entry.xml} (<size>)"
        coco["images"].append({"id": image_number, "file_name": name, "height": height, "width": width})
        for obj in record.objects:
            xmin, ymin, xmax, ymax = obj.box
            ann = {"id": len(coco["annotations"]) + 1, "image_id": image_number, "category_id": ids[obj.name]}
            bbox = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
            coco["annotations"].append({**ann, "bbox": bbox, "iscrowd": int(obj.difficult)})
    data = SplitData(layout, split, image_root, coco, split_source(root, split, layout), size_sources)
    data.notes.extend(_case_warnings(class_files))
    if layout != "voc":
        unlabelled = _images_without_xml(image_root, coco["images"])
        if unlabelled:
            # Left out, not kept as background: an image LabelImg has no XML for may simply not be labelled yet.
            data.notes.append(
                f"{len(unlabelled)} image(s) without an XML file left out (e.g. {unlabelled[0]}; an image with no "
                "object needs an XML without <object>)"
            )
    return finish_split(data)


def _image_name(finder: _ImageFinder, entry: VocEntry) -> str:
    """The file name of ``entry``'s image in the finder's folder; a DatasetError naming where it is listed if none."""
    name = finder.find(entry)
    if name is None:
        raise DatasetError(
            f"{entry.where}: no image for {entry.image_id} in {finder.folder} (looked for {entry.image_id} with an "
            f"image extension in any case, e.g. {entry.image_id}.jpg, and {entry.record.filename or 'no'} <filename>)"
        )
    return name


def _has_size(record: VocRecord) -> bool:
    return record.height > 0 and record.width > 0


def _image_sizes(entries: list[VocEntry], names: list[str], image_root: str, source: str) -> list[tuple[int, int]]:
    """Each image's ``(height, width)``: its XML's ``<size>``, else its header's (read in one go, so that every
    unreadable image is named in one error)."""
    unsized = [os.path.join(image_root, n) for e, n in zip(entries, names, strict=True) if not _has_size(e.record)]
    read = iter(header_sizes(unsized, source))
    return [(entry.record.height, entry.record.width) if _has_size(entry.record) else next(read) for entry in entries]


def _images_without_xml(folder: str, images: list[dict[str, Any]]) -> list[str]:
    """The image files in a ``roboflow-voc`` split folder that no XML of ``images`` named."""
    used = {info["file_name"] for info in images}
    return sorted(n for n in _image_files(folder) if n not in used)
