"""The builders that read the configuration: datasets, the class count, class names."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import NamedTuple

from models.config import Config, ConfigError, DataConfig

from .dataset import DetectionDataset
from .errors import DatasetError
from .layouts import read_class_names, read_split
from .shapes import CATEGORIES as SHAPES_CATEGORIES
from .transforms import build_transforms


def build_dataset(cfg: DataConfig, split: str, transforms: bool = True) -> DetectionDataset:
    """The ``train`` or ``val`` split of ``cfg.root``, whatever its layout, with the original's transforms for it
    (``transforms=False``: samples are the uint8 image and its XYXY pixel target, untransformed)."""
    pipeline = build_transforms(cfg, train=split == "train") if transforms else None
    return DetectionDataset(read_split(cfg, split), pipeline)


def check_num_classes(dataset: DetectionDataset, num_classes: int | str) -> None:
    """Labels are category ids (the original's convention), so every id must be < ``model.num_classes``."""
    ids = dataset.category_ids()
    if isinstance(num_classes, int) and ids and max(ids) >= num_classes:
        raise DatasetError(
            f"{dataset.source} has category ids up to {max(ids)} but model.num_classes is {num_classes}; "
            f"set model.num_classes={max(ids) + 1} (or model.num_classes=auto)"
        )


def has_boxes(dataset: DetectionDataset) -> bool:
    """Whether a split holds a box a detector learns from or is scored on (crowd and VOC difficult ones are not)."""
    return any(not ann.get("iscrowd", 0) for ann in dataset.coco.dataset["annotations"])


def check_has_boxes(dataset: DetectionDataset) -> None:
    """A training split needs at least one box to learn from (crowd and VOC difficult ones are ignored)."""
    if not has_boxes(dataset):
        found = "; ".join(dataset.data.notes)
        raise DatasetError(
            f"the {dataset.layout} split {dataset.split!r} ({dataset.source}) has no box to train on"
            + (f": {found}" if found else "")
        )


def validation_without_boxes(dataset: DetectionDataset) -> list[str]:
    """A warning when the validation split has no box to score against (its AP is undefined, reported as -1)."""
    if has_boxes(dataset):
        return []
    return [
        f"warning: the validation split {dataset.split!r} ({dataset.source}) has no box: every validation AP is -1 "
        "(undefined), so no checkpoint_best.pth is kept and train.patience has nothing to judge by; set "
        "data.val_split to a split with boxes"
    ]


def resolve_num_classes(cfg: Config, train_set: DetectionDataset | None = None) -> Config:
    """``cfg`` with ``model.num_classes: auto`` replaced by the largest category id of the training data + 1 (labels
    are category ids); an integer is left as it is. Without ``train_set`` the training split's annotations are read
    (no image is). Returns a new Config; ``cfg`` is not modified.

    Raises:
        ConfigError: num_classes is another string. DatasetError: the training data has no category.
    """
    value = cfg.model.num_classes
    if isinstance(value, int):
        return cfg
    if value != "auto":
        raise ConfigError(f"config key 'model.num_classes' must be an integer >= 1 or 'auto', got {value!r}")
    ids = (train_set or build_dataset(cfg.data, "train", transforms=False)).category_ids()
    if not ids:
        raise DatasetError(f"model.num_classes=auto: the training split of {cfg.data.root} lists no category")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=max(ids) + 1))


def dataset_class_names(cfg: DataConfig) -> dict[int, str]:
    """Category id -> name of the data set ``cfg`` describes, from its annotations alone (the synthetic shapes'
    names when that set is asked for but not generated yet); empty when none can be read (callers then show
    numeric ids)."""
    try:
        return read_class_names(cfg)
    except (DatasetError, OSError):
        if cfg.synthetic == "shapes":
            return {i + 1: name for i, name in enumerate(SHAPES_CATEGORIES)}
        return {}


class DatasetIndex(NamedTuple):
    """One split's images and classes (:func:`dataset_index`)."""

    image_ids: dict[str, int]  # real absolute path, and unique file name -> image id
    class_names: dict[int, str]  # category id -> name
    image_sizes: dict[int, tuple[int, int]]  # image id -> (height, width) as annotated


def dataset_index(cfg: DataConfig) -> DatasetIndex:
    """The images and classes of the data set ``cfg`` describes (its val split, else its train split), so that
    detections on those files can be scored against it; empty when neither split can be read. Each image is keyed
    by its real absolute path, and by its file name (without folders) where no other image of the split has that
    name: a copy elsewhere is still found, and images of one name in several folders only by their own paths."""
    for split in ("val", "train"):
        try:
            data = read_split(cfg, split)
        except (DatasetError, OSError):
            continue
        images = data.coco["images"]
        names = Counter(os.path.basename(info["file_name"]) for info in images)
        ids = {os.path.basename(info["file_name"]): int(info["id"]) for info in images}
        ids = {name: image_id for name, image_id in ids.items() if names[name] == 1}
        for info in images:
            ids[os.path.realpath(os.path.join(data.image_root, info["file_name"]))] = int(info["id"])
        sizes = {int(info["id"]): (int(info["height"]), int(info["width"])) for info in images}
        return DatasetIndex(ids, {int(cat["id"]): str(cat["name"]) for cat in data.coco["categories"]}, sizes)
    return DatasetIndex({}, {}, {})
