"""Detection data: reading the COCO, Roboflow COCO, YOLO, VOC and Roboflow VOC layouts into one in-memory COCO
dict, the original's augmentation, batching, the synthetic shapes set and the summary printed before training.

Conventions: boxes are pixel ``[x, y, w, h]`` in the COCO dicts (``dataset.coco``); after the transforms, targets
hold ``boxes`` (n, 4) normalised cxcywh and ``labels`` (n,) category ids. Modules: ``layouts`` (detection, split
names), ``coco`` / ``yolo`` / ``voc`` (the readers), ``split`` (the COCO dict and shared checks), ``decode`` (image
files -> upright RGB pixels, the one decoder of every tool), ``dataset`` (:class:`DetectionDataset`),
``transforms``, ``loader`` (collate, loader, per-epoch seeds), ``shapes`` (the synthetic demo set), ``summary``,
``scan`` (every image checked before training), ``build`` (the builders that read the config), ``categories`` (ids
across splits and checkpoints), ``coco_eval`` (detections in the COCO results format and pycocotools' 12 metrics,
for training and inference alike), ``errors`` (:class:`DatasetError`; the message of an error a DataLoader worker
raised).
"""

from .build import (
    DatasetIndex,
    build_dataset,
    check_has_boxes,
    check_num_classes,
    dataset_class_names,
    dataset_index,
    resolve_num_classes,
    validation_without_boxes,
)
from .categories import (
    align_for_training,
    align_to_checkpoint,
    checkpoint_ids,
    classes_without_training_boxes,
    in_dataset_ids,
)
from .coco import coco_annotation_file
from .dataset import DetectionDataset, coco_api, coco_target
from .errors import DatasetError, error_message
from .layouts import (
    LAYOUTS,
    check_data_root,
    detect_layout,
    fix_hint,
    read_class_names,
    read_split,
    resolve_layout,
)
from .loader import build_loader, collate, set_epoch
from .scan import find_bad_images
from .shapes import CATEGORIES as SHAPES_CATEGORIES
from .shapes import MARKER, ensure_synthetic, make_shapes, make_shapes_from_config
from .split import SplitData
from .summary import max_objects, summarise
from .transforms import build_transforms, resized_shape

__all__ = [
    "LAYOUTS",
    "MARKER",
    "SHAPES_CATEGORIES",
    "DatasetError",
    "DetectionDataset",
    "SplitData",
    "align_for_training",
    "align_to_checkpoint",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "check_data_root",
    "check_has_boxes",
    "check_num_classes",
    "checkpoint_ids",
    "in_dataset_ids",
    "classes_without_training_boxes",
    "coco_annotation_file",
    "coco_api",
    "coco_target",
    "collate",
    "dataset_class_names",
    "DatasetIndex",
    "dataset_index",
    "detect_layout",
    "ensure_synthetic",
    "find_bad_images",
    "error_message",
    "fix_hint",
    "make_shapes",
    "make_shapes_from_config",
    "max_objects",
    "read_class_names",
    "read_split",
    "resolve_layout",
    "resized_shape",
    "resolve_num_classes",
    "set_epoch",
    "summarise",
    "validation_without_boxes",
]
