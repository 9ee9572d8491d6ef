"""Which layout ``data.root`` holds (``data.format``: auto | coco | roboflow | yolo | voc | roboflow-voc) and which
splits to read.

Split names ``auto`` (the default) pick per layout: COCO ``train2017`` / ``val2017``, else ``train`` / ``val``
(CVAT's and Datumaro's export), else the one ``annotations/instances_*train*.json`` / ``*val*`` (COCO images in
``<split>/``, else ``images/<split>/``); Roboflow (COCO or VOC) ``train`` / ``valid`` (``val``, ``test``), YOLO
data.yaml's ``train`` / ``val``, VOC ``train`` / ``val`` (``trainval`` / ``test`` when those are what ImageSets has).
"""

from __future__ import annotations

import glob
import os

from models.config import DataConfig

from .coco import (
    ROBOFLOW_FILE,
    annotated_category_ids,
    coco_annotation_file,
    coco_image_folder,
    read_categories,
    read_coco_file,
)
from .errors import DatasetError
from .split import SplitData
from .voc import has_split, read_voc, voc_class_names
from .yolo import YAML_FILE, read_data_yaml, read_yolo

LAYOUTS = {
    "coco": "annotations/instances_<split>.json and a <split>/ or images/<split>/ image folder (e.g. train2017/)",
    "roboflow": "train/, valid/ (test/) folders, each with its images and _annotations.coco.json",
    "yolo": "data.yaml (names, train, val) with images/<split>/ and labels/<split>/*.txt",
    "voc": "JPEGImages/, Annotations/*.xml and ImageSets/Main/<split>.txt",
    "roboflow-voc": "train/, valid/ (test/) folders, each with its images and one VOC .xml per image",
}
VOC_LAYOUTS = ("voc", "roboflow-voc")
COCO_HINT = (
    "point data.root at a folder in one of the layouts " + ", ".join(LAYOUTS) + "; for COCO 2017 download "
    "https://cocodataset.org/#download (train2017.zip, val2017.zip, annotations_trainval2017.zip) and unzip them "
    "into {root} so that {root}/train2017/, {root}/val2017/ and {root}/annotations/instances_train2017.json exist "
    "(data.synthetic=shapes generates the small demo data set instead)"
)
SHAPES_HINT = (
    "data.synthetic=shapes generates the demo data set there when training starts (tools/train.py), or run "
    "tools/make_shapes.py CONFIG data.root={root}"
)


def fix_hint(cfg: DataConfig) -> str:
    """How to get data into ``cfg.root``: the layouts and where COCO comes from, or how to generate the demo set."""
    return (SHAPES_HINT if cfg.synthetic == "shapes" else COCO_HINT).format(root=cfg.root)


def check_data_root(cfg: DataConfig) -> None:
    """Raises :class:`DatasetError` naming ``cfg.root`` when it does not exist."""
    if not os.path.exists(cfg.root):
        raise DatasetError(f"data.root {cfg.root} does not exist: {fix_hint(cfg)}")


def _yaml_path(root: str) -> str:
    return root if os.path.isfile(root) else os.path.join(root, YAML_FILE)


def detect_layout(root: str) -> str | None:
    """The first layout whose files ``root`` has (in the order of :data:`LAYOUTS`), else None."""
    if os.path.isfile(root):
        return "yolo" if root.endswith((".yaml", ".yml")) else None
    if glob.glob(os.path.join(glob.escape(root), "annotations", "instances_*.json")):
        return "coco"
    if glob.glob(os.path.join(glob.escape(root), "*", ROBOFLOW_FILE)):
        return "roboflow"
    if os.path.isfile(os.path.join(root, YAML_FILE)):
        return "yolo"
    if all(os.path.isdir(os.path.join(root, d)) for d in ("JPEGImages", "Annotations")):
        return "voc"
    if any(has_split(root, split, "roboflow-voc") for split in ("train", "valid", "val", "test")):
        return "roboflow-voc"
    return None


def no_match_message(root: str) -> str:
    """Lists the layouts looked for (and the files each needs) and what the top of ``root`` holds."""
    names = sorted(os.listdir(root))
    shown = [n + ("/" if os.path.isdir(os.path.join(root, n)) else "") for n in names[:20]]
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    needs = "".join(f"\n  {name}: {files}" for name, files in LAYOUTS.items())
    return (
        f"data.root {root} matches none of the layouts looked for:{needs}\n"
        f"found at the top of {root}: {', '.join(shown) or 'nothing'}{more}\n"
        "point data.root at the folder holding these files, or set data.format to the layout it is in (COCO "
        "annotation files of other names or places: data.train_ann / data.val_ann)"
    )


def resolve_layout(cfg: DataConfig) -> str:
    """``cfg.format``, or when it is ``auto`` the layout detected in ``cfg.root``: COCO when ``data.train_ann`` or
    ``data.val_ann`` names an annotation file (only that layout reads them), else :func:`detect_layout`'s."""
    check_data_root(cfg)
    if cfg.format != "auto":  # one of LAYOUTS: DataConfig refuses any other value
        return cfg.format
    if cfg.train_ann or cfg.val_ann:
        return "coco"
    layout = detect_layout(cfg.root)
    if layout is None:
        raise DatasetError(no_match_message(cfg.root))
    return layout


def _coco_splits(root: str) -> list[str]:
    """The split names of the ``root/annotations/instances_<split>.json`` files, sorted."""
    files = glob.glob(os.path.join(glob.escape(root), "annotations", "instances_*.json"))
    return sorted(os.path.basename(f)[len("instances_") : -len(".json")] for f in files)


def _coco_split(root: str, train: bool) -> str:
    """COCO 2017's split name, else ``train`` / ``val`` (CVAT's and Datumaro's), else the only split name holding
    that word, among those with an annotation file; COCO 2017's when none is there."""
    preferred, word = ("train2017", "train") if train else ("val2017", "val")
    splits = _coco_splits(root)
    if preferred in splits or word in splits:
        return preferred if preferred in splits else word
    matching = [s for s in splits if word in s]
    return matching[0] if len(matching) == 1 else preferred


def _first_existing(candidates: tuple[str, ...], exists) -> str:
    return next((name for name in candidates if exists(name)), candidates[0])


def resolve_split(cfg: DataConfig, layout: str, which: str) -> str:
    """The split name to read for ``which`` (``train`` or ``val``): ``data.train_split`` / ``data.val_split``, or
    the layout's default when that is ``auto``."""
    train = which == "train"
    name = cfg.train_split if train else cfg.val_split
    if name != "auto":
        return name
    root = cfg.root
    if layout == "coco":
        return _coco_split(root, train)
    if layout == "roboflow":
        candidates = ("train",) if train else ("valid", "val", "test")
        return _first_existing(candidates, lambda s: os.path.isfile(os.path.join(root, s, ROBOFLOW_FILE)))
    if layout == "voc":
        candidates = ("train", "trainval") if train else ("val", "test")
        return _first_existing(candidates, lambda s: has_split(root, s, "voc"))
    if layout == "roboflow-voc":
        candidates = ("train",) if train else ("valid", "val", "test")
        return _first_existing(candidates, lambda s: has_split(root, s, "roboflow-voc"))
    return "train" if train else "val"


def read_split(cfg: DataConfig, which: str) -> SplitData:
    """The ``train`` or ``val`` split of ``cfg.root`` in whichever layout it is, as a COCO dict (no images read)."""
    if which not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {which!r}")
    layout = resolve_layout(cfg)
    split = resolve_split(cfg, layout, which)
    if layout == "coco":
        return _read_coco(cfg, which, split)
    if layout == "roboflow":
        ann_file = _annotation_file(cfg, layout, which)
        if not os.path.isfile(ann_file):
            raise DatasetError(_missing_roboflow_split(cfg, which, ann_file))
        used = _used_in_other_splits(cfg, ann_file)
        return read_coco_file(ann_file, os.path.join(cfg.root, split), layout=layout, split=split, used_elsewhere=used)
    if layout == "yolo":
        return read_yolo(_yaml_path(cfg.root), split)
    class_splits = [resolve_split(cfg, layout, "train"), resolve_split(cfg, layout, "val")]
    return read_voc(cfg.root, split, class_splits, layout)


def _read_coco(cfg: DataConfig, which: str, split: str) -> SplitData:
    """The COCO split ``split`` read for ``which``: its annotation file, its images in ``root/<split>/`` or
    ``root/images/<split>/``; what is missing is named with what to set."""
    ann_file = _annotation_file(cfg, "coco", which)
    if not os.path.isfile(ann_file):
        raise DatasetError(_missing_coco_annotations(cfg, which, ann_file))
    image_root = coco_image_folder(cfg.root, split)
    hint = fix_hint(cfg)
    if cfg.train_ann or cfg.val_ann or split not in ("train2017", "val2017"):  # not COCO 2017: images are the user's
        cvat = os.path.join(cfg.root, "images", split)
        hint = (
            f"the file_name entries of {ann_file} are read relative to data.root/data.{which}_split "
            f"({image_root}, or {cvat} where that does not exist); set data.{which}_split to the folder under "
            f"data.root that they are relative to (data.{which}_split=. for data.root itself)"
        )
    return read_coco_file(ann_file, image_root, layout="coco", split=split, hint=hint)


def _missing_coco_annotations(cfg: DataConfig, which: str, ann_file: str) -> str:
    """Why the COCO annotation file of ``which`` is missing and what to set: with data.train_ann or data.val_ann
    set, :func:`_annotation_hint`; else the ``instances_*.json`` files the annotations folder holds and the split
    names that read them, or where COCO 2017 comes from when it holds none."""
    if cfg.train_ann or cfg.val_ann:
        return f"annotation file {ann_file} does not exist: {_annotation_hint(cfg, which)}"
    splits = _coco_splits(cfg.root)
    if not splits:
        return f"annotation file {ann_file} does not exist: {fix_hint(cfg)}"
    train = next((s for s in splits if "train" in s), splits[0])
    val = next((s for s in splits if "val" in s and s != train), next((s for s in splits if s != train), train))
    both = " (one split for both, so validation scores the training images)" if train == val else ""
    preferred, word = ("train2017", "train") if which == "train" else ("val2017", "val")
    looked = (
        f" (data.{which}_split=auto reads instances_{preferred}.json, else instances_{word}.json, else the only "
        f"instances_*{word}*.json)"
    )
    found = ", ".join(f"instances_{s}.json" for s in splits)
    return (
        f"annotation file {ann_file} does not exist: no {which} split"
        f"{looked if getattr(cfg, f'{which}_split') == 'auto' else ''}; {os.path.join(cfg.root, 'annotations')} "
        f"holds {found}: read {'it' if len(splits) == 1 else 'them'} with data.train_split={train} "
        f"data.val_split={val}{both}; the images of split S are read from data.root/S/ or data.root/images/S/"
    )


def _annotation_file(cfg: DataConfig, layout: str, which: str) -> str:
    split = resolve_split(cfg, layout, which)
    if layout == "roboflow":
        return os.path.join(cfg.root, split, ROBOFLOW_FILE)
    return coco_annotation_file(cfg.root, split, cfg.train_ann if which == "train" else cfg.val_ann)


def read_class_names(cfg: DataConfig) -> dict[int, str]:
    """Category id -> name of the data set in ``cfg.root`` from its annotations alone (no image is opened): the
    val split's file, else the train split's, for COCO and Roboflow; data.yaml's names; the VOC classes."""
    layout = resolve_layout(cfg)
    if layout == "yolo":
        return {index + 1: name for index, name in read_data_yaml(_yaml_path(cfg.root))["names"].items()}
    if layout in VOC_LAYOUTS:
        splits = [resolve_split(cfg, layout, "train"), resolve_split(cfg, layout, "val")]
        return {i: name for i, name in enumerate(voc_class_names(cfg.root, splits, layout=layout), start=1)}
    files = [_annotation_file(cfg, layout, which) for which in ("val", "train")]
    existing = [path for path in files if os.path.isfile(path)]
    if not existing:
        raise DatasetError(f"neither annotation file exists: {' nor '.join(files)}")
    if layout == "roboflow":
        return read_categories(existing[0], roboflow=True, used_elsewhere=_used_in_other_splits(cfg, existing[0]))
    return read_categories(existing[0])


def _used_in_other_splits(cfg: DataConfig, ann_file: str) -> set[int]:
    """The category ids annotated in the Roboflow train and val files other than ``ann_file``: a category with boxes
    in one split is a class in every split, not the unused supercategory entry that is dropped."""
    used: set[int] = set()
    for which in ("train", "val"):
        other = _annotation_file(cfg, "roboflow", which)
        if os.path.isfile(other) and not os.path.samefile(other, ann_file):
            used |= annotated_category_ids(other)
    return used


def _missing_roboflow_split(cfg: DataConfig, which: str, ann_file: str) -> str:
    """Why the Roboflow split ``which`` cannot be read: the split folders tried, those found, the key to set."""
    key = f"data.{which}_split"
    name = getattr(cfg, f"{which}_split")
    tried = [name] if name != "auto" else ["train"] if which == "train" else ["valid", "val", "test"]
    root = cfg.root
    found = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, ROBOFLOW_FILE)))
    return (
        f"annotation file {ann_file} does not exist: no {which} split (tried the split folder(s) "
        f"{', '.join(tried)}; folders with {ROBOFLOW_FILE} found: {', '.join(found) or 'none'}); set {key} to one "
        f"of them (e.g. {key}={found[0] if found else 'train'})"
    )


def _annotation_hint(cfg: DataConfig, which: str) -> str:
    """What to do when the COCO annotation file of ``which`` is missing and data.train_ann or data.val_ann is set
    (the data is not the COCO 2017 download then): correct the key, or set the one that is not (its default path,
    ``annotations/instances_<split>.json``, is rarely where a file named by the other key has its partner)."""
    key, other = f"data.{which}_ann", "data.val_ann" if which == "train" else "data.train_ann"
    found = sorted(glob.glob(os.path.join(glob.escape(cfg.root), "annotations", "*.json")))
    there = f" (.json files in {os.path.join(cfg.root, 'annotations')}: {', '.join(map(os.path.basename, found))})"
    what = f"correct {key}" if getattr(cfg, f"{which}_ann") else f"{other} is set but {key} is not: set {key}=PATH"
    return f"{what} (relative to data.root unless absolute){there if found else ''}"
