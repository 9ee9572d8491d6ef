"""COCO-format annotation files: the COCO layout and Roboflow's COCO export (read), and one split written in the
COCO layout (:func:`write_coco_split`, for the synthetic data sets).

COCO: ``root/annotations/instances_<split>.json`` (``data.train_ann`` / ``data.val_ann`` name another file) and
the images in ``root/<split>/``, or where that folder does not exist in ``root/images/<split>/`` (CVAT's and
Datumaro's "COCO 1.0" export). Roboflow: ``root/<split>/`` holding the images and ``_annotations.coco.json``,
splits ``train``, ``valid``, ``test``; Roboflow adds a category (often id 0, named as the project, which may be the
name of the only class) that only serves as the others' supercategory and has no box in any split: it is dropped, the
other ids are kept as given.

An annotation without a box (``"bbox": []`` or no ``bbox``) takes the box enclosing its ``segmentation``, as
CVAT's and Label Studio's segmentation exports need. A ``file_name`` that differs from the file on disk only in
Unicode normalisation (NFC in the JSON, NFD on disk, as macOS zips write names) reads the file on disk; one image
file listed under two image ids is refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import cv2
import numpy as np

from .errors import DatasetError, read_text
from .scan import header_sizes
from .segmentation import box_from_segmentation, is_number
from .split import SplitData, finish_split, name_on_disk

ROBOFLOW_FILE = "_annotations.coco.json"
ANNOTATION_NEEDS = (
    "an annotation needs an 'id', a 'bbox' [x, y, w, h] in pixels (or a 'segmentation' to take it from), an integer "
    "'category_id' and the 'image_id' of one of the file's images"
)


def coco_annotation_file(root: str, split: str, ann: str = "") -> str:
    """``ann`` (relative to ``root`` unless absolute) or the default ``root/annotations/instances_<split>.json``."""
    if ann:
        return ann if os.path.isabs(ann) else os.path.join(root, ann)
    return os.path.join(root, "annotations", f"instances_{split}.json")


def coco_image_folder(root: str, split: str) -> str:
    """The image folder of the COCO split ``split``: ``root/<split>``, or ``root/images/<split>`` (CVAT's and
    Datumaro's export) where only that one exists."""
    folder, cvat = os.path.join(root, split), os.path.join(root, "images", split)
    return cvat if not os.path.isdir(folder) and os.path.isdir(cvat) else folder


def read_coco_file(
    ann_file: str,
    image_root: str,
    *,
    layout: str,
    split: str,
    hint: str = "",
    used_elsewhere: Collection[int] = (),
) -> SplitData:
    """Reads one COCO-format annotation file whose ``file_name`` entries are relative to ``image_root``.

    ``used_elsewhere``: the category ids that the data set's other split files annotate (Roboflow: a category with
    boxes there is a class, not the unused supercategory entry that is dropped).

    Raises:
        DatasetError: a missing file or folder, malformed JSON or entries, an unknown category id, a listed image
            missing from ``image_root``, or no image at all; the message names the file.
    """
    suffix = f": {hint}" if hint else ""
    for path, kind in ((ann_file, "annotation file"), (image_root, "image folder")):
        if not os.path.exists(path):
            raise DatasetError(f"{kind} {path} does not exist{suffix}")
    payload = _load(ann_file)
    boxed = _check_structure(payload, ann_file)
    renamed = _check_images(payload, image_root, ann_file)
    _check_unique_files(payload, ann_file)
    if layout == "roboflow":
        payload["categories"] = drop_unused_supercategories(payload, used_elsewhere)
    data = SplitData(layout=layout, split=split, image_root=image_root, coco=payload, source=ann_file)
    if boxed:
        data.notes.append(f"{boxed} box(es) taken from the segmentation (annotations with an empty or missing bbox)")
    if renamed:
        data.notes.append(
            f"{len(renamed)} file_name(s) read as the file on disk whose name differs only in Unicode normalisation, "
            f"e.g. {renamed[0]!r}"
        )
    repeated = _renumber_repeated_annotation_ids(payload["annotations"])
    if repeated:
        data.notes.append(f"{repeated} repeated annotation id(s), the annotations renumbered 1..N in memory")
    return finish_split(data)


def read_categories(ann_file: str, roboflow: bool = False, used_elsewhere: Collection[int] = ()) -> dict[int, str]:
    """Category id -> name of a COCO-format annotation file, without looking at its images (Roboflow's unused
    supercategory dropped when ``roboflow``; ``used_elsewhere`` as :func:`read_coco_file`'s)."""
    try:
        payload = _load(ann_file)
    except OSError as exc:
        raise DatasetError(f"cannot read annotation file {ann_file}: {exc}") from exc
    _check_structure(payload, ann_file)
    categories = drop_unused_supercategories(payload, used_elsewhere) if roboflow else payload["categories"]
    return {cat["id"]: str(cat["name"]) for cat in sorted(categories, key=lambda c: c["id"])}


def annotated_category_ids(ann_file: str) -> set[int]:
    """The category ids that the annotations of a COCO-format file use (its entries not checked: reading that file
    as a split checks them)."""
    try:
        payload = _load(ann_file)
    except OSError as exc:
        raise DatasetError(f"cannot read annotation file {ann_file}: {exc}") from exc
    annotations = payload.get("annotations") if isinstance(payload, dict) else None
    return {ann.get("category_id") for ann in annotations or [] if isinstance(ann, dict)}


def _load(ann_file: str) -> Any:
    """The parsed JSON of ``ann_file``; malformed JSON or bytes that are not UTF-8 are a DatasetError naming it."""
    text = read_text(ann_file)
    try:
        return json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise DatasetError(f"annotation file {ann_file} is malformed ({type(exc).__name__}: {exc})") from exc


def _check_structure(payload: Any, ann_file: str) -> int:
    """The top level is a dict with ``images``, ``annotations`` and ``categories`` lists of well-formed entries.
    Returns how many annotations took their box from their segmentation (in place: :func:`_check_annotation`)."""
    if not isinstance(payload, dict):
        raise DatasetError(f"annotation file {ann_file} is malformed: the top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(payload.get(key), list):
            raise DatasetError(f"annotation file {ann_file} is malformed: no '{key}' list")
    for info in payload["images"]:
        if not isinstance(info, dict) or not isinstance(info.get("file_name"), str) or "id" not in info:
            raise DatasetError(
                f"annotation file {ann_file} is malformed: image entry {json.dumps(info)[:200]} needs an 'id' and "
                "a 'file_name'"
            )
    for cat in payload["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise DatasetError(
                f"annotation file {ann_file} is malformed: category {json.dumps(cat)[:200]} needs an integer 'id' "
                "and a 'name'"
            )
    image_ids = _unique_ids(payload["images"], "image", ann_file)
    category_ids = _unique_ids(payload["categories"], "category", ann_file)
    if min(category_ids, default=0) < 0:
        raise DatasetError(
            f"annotation file {ann_file}: category id {min(category_ids)} is negative; category ids are the labels "
            "the model learns and must be >= 0"
        )
    return sum(_check_annotation(ann, image_ids, ann_file) for ann in payload["annotations"])


def _unique_ids(entries: list[dict[str, Any]], kind: str, ann_file: str) -> set[int]:
    """The integer ``id`` of every entry, which must be unique: pycocotools indexes images and categories by id, so
    a repeated one would keep only the last entry (an image's boxes moved to another image, a class renamed)."""
    seen: dict[int, dict[str, Any]] = {}
    for entry in entries:
        ident = entry["id"]
        if not isinstance(ident, int) or isinstance(ident, bool):
            raise DatasetError(
                f"annotation file {ann_file} is malformed: {kind} id {json.dumps(ident)} is not an integer "
                f"({kind} {json.dumps(entry)[:200]})"
            )
        if ident in seen:
            raise DatasetError(
                f"annotation file {ann_file}: {kind} id {ident} is used twice ({json.dumps(seen[ident])[:120]} and "
                f"{json.dumps(entry)[:120]}); every {kind} needs its own id"
            )
        seen[ident] = entry
    return set(seen)


def _renumber_repeated_annotation_ids(annotations: list[dict[str, Any]]) -> int:
    """Numbers the annotations 1..N in place if any id repeats (merged exports do this; pycocotools would return
    one box twice and lose the other when scoring) and returns how many ids repeated; nothing refers to an
    annotation's id, so renumbering loses nothing."""
    repeated = len(annotations) - len({repr(ann["id"]) for ann in annotations})
    if repeated:
        for number, ann in enumerate(annotations, start=1):
            ann["id"] = number
    return repeated


def _check_annotation(ann: Any, image_ids: set[int], ann_file: str) -> bool:
    """Refuses an annotation that is malformed, saying which condition failed; an empty or missing ``bbox`` is
    taken, in place, from a non-empty ``segmentation``. Returns whether it was."""
    problem = _annotation_problem(ann, image_ids)
    boxed = problem is None and _is_empty(ann.get("bbox"))
    if boxed:
        box = box_from_segmentation(ann["segmentation"])
        if box is None:
            problem = (
                f"its bbox is {'empty' if 'bbox' in ann else 'missing'} and its segmentation "
                f"{json.dumps(ann['segmentation'])[:120]} is neither polygons "
                '[[x1, y1, x2, y2, ...], ...] of finite numbers nor RLE {"size": [h, w], "counts": ...}'
            )
        else:
            ann["bbox"] = box
    if problem is not None:
        ident = ann.get("id", "?") if isinstance(ann, dict) else "?"
        raise DatasetError(
            f"annotation file {ann_file} is malformed: annotation id {ident}: {problem}; {ANNOTATION_NEEDS} (got "
            f"{json.dumps(ann)[:200]})"
        )
    if not all(math.isfinite(v) for v in ann["bbox"]):  # Python's json writes NaN and Infinity, and reads them back
        raise DatasetError(
            f"annotation file {ann_file}: annotation id {ann['id']} (image id {ann['image_id']}) has a 'bbox' value "
            f"that is not a finite number: {json.dumps(ann['bbox'])}; give the box in pixels, [x, y, w, h]"
        )
    return boxed


def _annotation_problem(ann: Any, image_ids: set[int]) -> str | None:
    """Which condition an annotation fails (None: it passes; an empty bbox passes where it has a segmentation)."""
    if not isinstance(ann, dict):
        return "it is not a JSON object"
    for key in ("id", "category_id", "image_id"):
        if key not in ann:
            return f"it has no '{key}'"
    if not isinstance(ann["category_id"], int):
        return f"its category_id {json.dumps(ann['category_id'])} is not an integer"
    image_id = ann["image_id"]
    if not isinstance(image_id, (int, float)) or image_id not in image_ids:
        return f"its image_id {json.dumps(image_id)} is not among the images of the file"
    bbox = ann.get("bbox")
    if _is_empty(bbox):
        if _is_empty(ann.get("segmentation")):
            return f"its bbox is {'empty' if 'bbox' in ann else 'missing'} and it has no segmentation to take it from"
        return None
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        return f"its bbox {json.dumps(bbox)[:120]} is not [x, y, w, h], four numbers"
    return None


def _is_empty(value: Any) -> bool:
    """Whether a ``bbox`` or ``segmentation`` is missing or empty (None, [], {}; exporters write each)."""
    return value is None or value == [] or value == {}


def _check_images(payload: dict[str, Any], image_root: str, ann_file: str) -> list[str]:
    """Every listed image exists (a ``file_name`` that matches a file only up to Unicode normalisation is set to
    that file's name); sizes missing from the file are read from the image headers. Returns the names so changed."""
    present = set(os.listdir(image_root))
    missing, renamed = [], []
    listings: dict[str, dict[str, str]] = {}
    for info in payload["images"]:
        name = info["file_name"]
        if name in present or os.path.isfile(os.path.join(image_root, name)):
            continue
        on_disk = name_on_disk(image_root, name, listings)
        if on_disk is None:
            missing.append(name)
        else:
            info["file_name"] = on_disk
            renamed.append(name)
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) listed in {ann_file} are missing from {image_root}, e.g. "
            f"{os.path.join(image_root, missing[0])}"
        )
    for info in payload["images"]:
        _check_image_size(info, ann_file)
    unsized = [
        i for i in payload["images"] if not isinstance(i.get("height"), int) or not isinstance(i.get("width"), int)
    ]
    sizes = header_sizes([os.path.join(image_root, info["file_name"]) for info in unsized], ann_file)
    for info, (height, width) in zip(unsized, sizes, strict=True):
        info["height"], info["width"] = height, width
    return renamed


def _check_unique_files(payload: dict[str, Any], ann_file: str) -> None:
    """Refuses an image file listed under two image ids (merged exports): one entry would train with the boxes of
    its id and the other, the same picture, as an image without them."""
    first: dict[str, dict[str, Any]] = {}
    for info in payload["images"]:
        key = os.path.normpath(info["file_name"])
        if key not in first:
            first[key] = info
            continue
        ids = (first[key]["id"], info["id"])
        boxes = [sum(ann["image_id"] == i for ann in payload["annotations"]) for i in ids]
        raise DatasetError(
            f"annotation file {ann_file}: image file {info['file_name']} is listed twice, as image id {ids[0]} "
            f"({boxes[0]} annotation(s)) and image id {ids[1]} ({boxes[1]} annotation(s)); one copy would train as an "
            f"image without the other's boxes: merge their annotations onto one image id and remove the other entry"
        )


def _check_image_size(info: dict[str, Any], ann_file: str) -> None:
    """A ``width`` / ``height`` given as a number must be a positive finite one: boxes are clipped to it and sizes
    chosen from it (a size given otherwise, e.g. a float, is read from the image)."""
    for key in ("width", "height"):
        value = info.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and not (math.isfinite(value) and value > 0):
            raise DatasetError(
                f"annotation file {ann_file}: image id {info['id']} ({info['file_name']}) has {key} "
                f"{json.dumps(value)}; it must be the image's size in pixels, a number > 0"
            )


def drop_unused_supercategories(payload: dict[str, Any], used_elsewhere: Collection[int] = ()) -> list[dict[str, Any]]:
    """The categories minus those without any annotation (in ``payload`` or, by id, ``used_elsewhere``) that are
    another category's ``supercategory`` (Roboflow's extra category, e.g. id 0 "cells" above "red", "white"; or id 0
    "fire" above id 1 "fire" when the project is named as its only class); ids are kept as given."""
    used = {ann["category_id"] for ann in payload["annotations"]} | set(used_elsewhere)
    categories = payload["categories"]
    children: dict[Any, set[int]] = {}  # supercategory name -> ids of the categories below it
    for cat in categories:
        children.setdefault(cat.get("supercategory"), set()).add(cat["id"])
    # Other ids, not other names: the project's entry and its only class may share the name, the class then naming
    # itself as its supercategory.
    return [cat for cat in categories if cat["id"] in used or not children.get(cat["name"], set()) - {cat["id"]}]


def write_coco_split(
    root: str,
    folder: str,
    samples: Iterable[tuple[np.ndarray, Sequence[tuple]]],
    class_names: Sequence[str],
    supercategory: str,
    description: str,
) -> list[int]:
    """Writes one split in the COCO layout the readers detect: ``root/<folder>/NNNNNN.jpg`` (JPEG quality 92, named
    by the image id, 1, 2, ... in order) and ``root/annotations/instances_<folder>.json`` (``folder``: ``train2017``,
    ``val2017``, ...).

    Args:
        samples: ``(image, objects)`` per image: a BGR ``uint8 (H, W, 3)`` array and its objects as
            ``(label, (x0, y0, x1, y1))`` boxes in pixels, labels 1-based indices into ``class_names`` (the category
            ids), or ``(label, box, area)`` where the object's pixel area is not its box's (a drawn mask).

    Returns:
        The number of objects per class.
    """
    os.makedirs(os.path.join(root, folder))
    images, annotations = [], []
    per_class = [0] * len(class_names)
    for i, (image, objects) in enumerate(samples):
        name = f"{i + 1:06d}.jpg"  # the image id
        cv2.imwrite(os.path.join(root, folder, name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": i + 1, "file_name": name, "height": image.shape[0], "width": image.shape[1]})
        for label, (x0, y0, x1, y1), *area in objects:
            per_class[label - 1] += 1
            box_area = area[0] if area else (x1 - x0) * (y1 - y0)
            box = {"bbox": [x0, y0, x1 - x0, y1 - y0], "area": box_area, "iscrowd": 0}
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label, **box})
    categories = [{"id": i + 1, "name": n, "supercategory": supercategory} for i, n in enumerate(class_names)]
    payload = {"info": {"description": description}, "images": images, "annotations": annotations}
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{folder}.json"), "w", encoding="utf-8") as f:
        json.dump({**payload, "categories": categories}, f)
    return per_class
