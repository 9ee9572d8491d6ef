"""One split of any layout as an in-memory COCO dict, and the checks every layout shares.

The dict is what training, evaluation (pycocotools ``COCO``/``COCOeval``) and inference read:

- ``images``: ``{"id": int, "file_name": str relative to the split's image folder, "height": int, "width": int}``;
- ``annotations``: ``{"id", "image_id", "category_id": int, "bbox": [x, y, w, h] in pixels (x, y the top-left
  corner, continuous coordinates: the image spans [0, width] x [0, height]), "area", "iscrowd": 0 | 1}``;
- ``categories``: ``{"id": int, "name": str}``; the category id is the label the model learns (the original's
  convention), so ``model.num_classes`` must exceed the largest id.

``iscrowd: 1`` boxes (COCO crowds, VOC ``difficult`` objects) are ignored by training and, as pycocotools does for
crowds, neither count as ground truth nor as false positives in evaluation.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from .decode import IMAGE_EXTENSIONS
from .errors import DatasetError


@dataclass
class SplitData:
    """A split read from disk: the COCO dict (module docstring), where its images are and what described it.

    ``clipped`` / ``dropped`` count the boxes that reached outside their image (clipped to it) and those with no
    area left inside it (removed from the dict); ``notes`` are remarks for the summary. ``size_sources`` names, per
    image id, the file that states the image's width and height where that is not ``source`` (VOC: the image's XML).
    """

    layout: str  # coco | roboflow | yolo | voc | roboflow-voc
    split: str  # the split's name in that layout, e.g. val2017, valid, val
    image_root: str  # file_name of each image is relative to this folder
    coco: dict[str, Any]
    source: str  # the file (or folder) that lists the split, named in messages
    size_sources: dict[int, str] = field(default_factory=dict)  # image id -> the file giving its size, if not source
    clipped: int = 0
    dropped: int = 0
    dropped_example: str = ""  # the first box dropped and why (:func:`clip_boxes`), for the summary
    notes: list[str] = field(default_factory=list)


CLIP_TOLERANCE = 0.01  # pixels a box may reach outside its image without being counted as clipped (rounding)


def clip_boxes(coco: dict[str, Any]) -> tuple[int, int, str]:
    """Clips every ``bbox`` of ``coco`` to its image in place and removes the annotations with no area left.

    ``area`` is set to the clipped box's area where it is missing (layouts without masks). Returns
    ``(clipped, dropped, example)``: how many boxes reached outside their image by more than
    :data:`CLIP_TOLERANCE` (rounding of normalised coordinates is clipped without being counted), how many were
    removed, and the first removed one with why (empty when none).
    """
    images = {info["id"]: info for info in coco["images"]}
    kept, clipped, dropped, example = [], 0, 0, ""
    for ann in coco["annotations"]:
        info = images[ann["image_id"]]
        width, height = float(info["width"]), float(info["height"])
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            example = example or _why_dropped(ann, info)
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            outside = max(x0 - x, y0 - y, x + w - x1, y + h - y1)
            clipped += outside > CLIP_TOLERANCE
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        ann.setdefault("area", (x1 - x0) * (y1 - y0))
        ann.setdefault("iscrowd", 0)
        kept.append(ann)
    coco["annotations"] = kept
    return clipped, dropped, example


def _why_dropped(ann: dict[str, Any], info: dict[str, Any]) -> str:
    """``image F, annotation N: bbox [x, y, w, h] <why it has no area in the image>``."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    if w < 0 or h < 0:
        why = "written backwards (a negative width or height: x/y max below min)"
    elif w == 0 or h == 0:
        why = "with no width or height"
    else:
        why = f"outside the {info['width']}x{info['height']} image"
    box = ", ".join(f"{v:g}" for v in (x, y, w, h))
    return f"image {info.get('file_name', info['id'])}, annotation {ann.get('id', '?')}: bbox [{box}] {why}"


def check_category_ids(coco: dict[str, Any], source: str) -> None:
    """Every annotation's ``category_id`` must be one of ``coco["categories"]``; the error names ``source``."""
    known = {cat["id"] for cat in coco["categories"]}
    for ann in coco["annotations"]:
        if ann["category_id"] not in known:
            raise DatasetError(
                f"{source}: annotation id {ann.get('id', '?')} (image id {ann['image_id']}) has category_id "
                f"{ann['category_id']}, which is not among the categories {sorted(known)}"
            )


def check_not_empty(data: SplitData) -> None:
    """A split without images is an error naming the file that lists it."""
    if not data.coco["images"]:
        raise DatasetError(f"the {data.layout} split '{data.split}' has no images: {data.source} lists none")


def finish_split(data: SplitData) -> SplitData:
    """The checks and clean-up every layout ends with: categories known, boxes clipped, at least one image."""
    check_not_empty(data)
    check_category_ids(data.coco, data.source)
    data.clipped, data.dropped, data.dropped_example = clip_boxes(data.coco)
    return data


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is one that listings of a data folder leave out: hidden ones (``.name``, such as
    the ``._photo.jpg`` metadata macOS writes beside copies on other file systems) and ``__MACOSX`` (where macOS
    zips keep that metadata), here and in the folders ``tools/infer.py`` is given
    (:func:`deformable.inference.images.list_images`); they are no images, and reading one stops a run."""
    return name.startswith(".") or name == "__MACOSX"


def list_image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, by extension, hidden files and folders left out: :func:`is_hidden`),
    as sorted paths relative to ``folder``."""
    return list_files(folder, IMAGE_EXTENSIONS)


def list_files(folder: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """Files under ``folder`` (recursive; with one of ``extensions``, any case, where given; hidden files and folders
    left out: :func:`is_hidden`), as sorted paths relative to ``folder``; none when it is no folder."""
    found = []
    for directory, subdirs, names in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not is_hidden(d))  # in place: os.walk then skips the others
        for name in names:
            if (extensions is None or name.lower().endswith(extensions)) and not is_hidden(name):
                found.append(os.path.relpath(os.path.join(directory, name), folder))
    return sorted(found)


def name_on_disk(folder: str, relative: str, listings: dict[str, dict[str, str]] | None = None) -> str | None:
    """``relative`` (a path under ``folder``, ``/``-separated) as the file system spells the file it names, up to
    Unicode normalisation (NFC in a list or annotation file, NFD on disk, as macOS zips write names; or the reverse),
    else None. ``listings`` caches each folder's names by their NFC form (pass one dict for many lookups): only names
    missing as given are looked up."""
    if os.path.isabs(relative):
        return None
    listings = {} if listings is None else listings
    parts = []
    for part in relative.split("/"):
        if not os.path.lexists(os.path.join(folder, part)):
            if folder not in listings:
                names = os.listdir(folder) if os.path.isdir(folder) else []
                listings[folder] = {unicodedata.normalize("NFC", name): name for name in names}
            part = listings[folder].get(unicodedata.normalize("NFC", part))
            if part is None:
                return None
        folder = os.path.join(folder, part)
        parts.append(part)
    return "/".join(parts) if os.path.isfile(folder) else None
