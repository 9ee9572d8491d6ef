"""COCO-layout detection data: ``root/<split>/`` images and ``root/annotations/instances_<split>.json``.

Read with pycocotools through torchvision's ``CocoDetection``; targets follow the original (ConvertCocoPolysToMask):
crowd annotations ignored, boxes clipped to the image and degenerate ones dropped, the category id is the label,
images without annotations kept. Batches are padded bottom/right with a mask (True = padding).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection
from torchvision.transforms.v2.functional import pil_to_tensor

from models.config import DataConfig

from .transforms import build_transforms

COCO_HINT = (
    "download COCO 2017 from https://cocodataset.org/#download (train2017.zip, val2017.zip, "
    "annotations_trainval2017.zip) and unzip them into {root} so that {root}/train2017/, {root}/val2017/ and "
    "{root}/annotations/instances_train2017.json exist, or set data.root=/path/to/coco "
    "(data.synthetic=shapes generates the small demo data set instead)"
)
SHAPES_HINT = "delete {root} and run again (data.synthetic=shapes regenerates it), or run tools/make_shapes.py {root}"


class DatasetError(RuntimeError):
    """Missing or malformed data; the message names the file and says how to fix it."""


def fix_hint(cfg: DataConfig) -> str:
    """How to repair ``cfg.root``: where COCO comes from, or how to regenerate the synthetic set."""
    template = SHAPES_HINT if cfg.synthetic == "shapes" else COCO_HINT
    return template.format(root=cfg.root)


def annotation_file(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


class CocoDataset(CocoDetection):
    """One split. ``dataset[i]`` -> ``(image (3, H, W) float, target)`` after ``transforms``, with target keys
    ``boxes`` (n, 4) normalised cxcywh, ``labels`` (n,) int64, ``image_id`` (1,), ``orig_size`` and ``size`` (2,)
    as (h, w) before / after augmentation."""

    def __init__(self, image_dir: str, ann_file: str, transforms: Any, hint: str = "") -> None:
        self.hint = hint
        for path, kind in ((ann_file, "annotation file"), (image_dir, "image folder")):
            if not os.path.exists(path):
                raise DatasetError(f"{kind} {path} does not exist: {hint}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                super().__init__(image_dir, ann_file, transforms=transforms)
        except (ValueError, AssertionError, KeyError, TypeError, UnicodeDecodeError) as exc:
            # json.JSONDecodeError is a ValueError; pycocotools asserts the top level is a dict
            problem = f"{type(exc).__name__}: {exc}"
            raise DatasetError(f"annotation file {ann_file} is malformed ({problem}): {hint}") from exc
        self.ann_file = ann_file
        self._check_annotations()
        self._check_images()

    def _check_annotations(self) -> None:
        for key in ("images", "annotations", "categories"):
            if not isinstance(self.coco.dataset.get(key), list):
                raise DatasetError(f"annotation file {self.ann_file} is malformed: no '{key}' list: {self.hint}")
        for info in self.coco.dataset["images"]:
            if not isinstance(info, dict) or not isinstance(info.get("file_name"), str) or "id" not in info:
                raise DatasetError(
                    f"annotation file {self.ann_file} is malformed: image entry {json.dumps(info)[:200]} needs an "
                    f"'id' and a 'file_name': {self.hint}"
                )
        for ann in self.coco.dataset["annotations"]:
            bbox = ann.get("bbox") if isinstance(ann, dict) else None
            ok = (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, (int, float)) for v in bbox)
                and isinstance(ann.get("category_id"), int)
                and ann.get("image_id") in self.coco.imgs
            )
            if not ok:
                ident = ann.get("id", "?") if isinstance(ann, dict) else "?"
                raise DatasetError(
                    f"annotation file {self.ann_file} is malformed: annotation id {ident} needs 'bbox' [x, y, w, h], "
                    f"an integer 'category_id' and a known 'image_id' (got {json.dumps(ann)[:200]}): {self.hint}"
                )

    def _check_images(self) -> None:
        present = set(os.listdir(self.root))
        missing = [
            info["file_name"]
            for info in self.coco.imgs.values()
            if info["file_name"] not in present and not os.path.isfile(os.path.join(self.root, info["file_name"]))
        ]
        if missing:
            raise DatasetError(
                f"{len(missing)} image(s) listed in {self.ann_file} are missing from {self.root}, e.g. "
                f"{os.path.join(self.root, missing[0])}: {self.hint}"
            )

    def category_ids(self) -> list[int]:
        return sorted(self.coco.cats.keys())

    def _load_image(self, id: int) -> tv_tensors.Image:
        path = os.path.join(self.root, self.coco.imgs[id]["file_name"])
        try:
            with Image.open(path) as picture:
                return tv_tensors.Image(pil_to_tensor(picture.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"cannot read image {path} (image id {id}): {exc}: {self.hint}") from exc

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        target = coco_target(self._load_target(image_id), image_id, height=image.shape[-2], width=image.shape[-1])
        return self.transforms(image, target)


def coco_target(annotations: list[dict[str, Any]], image_id: int, height: int, width: int) -> dict[str, Any]:
    """COCO annotations -> target with ``boxes`` BoundingBoxes (n, 4) XYXY in pixels and ``labels`` (n,) int64.

    Crowd annotations are ignored; boxes are clipped to the image and those with no area dropped (the original).
    """
    annotations = [a for a in annotations if not a.get("iscrowd", 0)]
    boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
        "labels": labels[keep],
        "image_id": torch.tensor([image_id]),
        "orig_size": torch.tensor([height, width]),
    }


def check_data_root(cfg: DataConfig) -> None:
    """Raises :class:`DatasetError` naming ``cfg.root`` when it does not exist."""
    if not os.path.isdir(cfg.root):
        raise DatasetError(f"data.root {cfg.root} does not exist: {fix_hint(cfg)}")


def build_dataset(cfg: DataConfig, split: str) -> CocoDataset:
    """The ``train`` or ``val`` split of ``cfg.root`` with the original's transforms for it."""
    check_data_root(cfg)
    train = split == "train"
    name = cfg.train_split if train else cfg.val_split
    transforms = build_transforms(
        train=train,
        train_scales=cfg.train_scales,
        train_max_size=cfg.train_max_size,
        crop=cfg.crop,
        crop_scales=cfg.crop_scales,
        crop_size=cfg.crop_size,
        val_size=cfg.val_size,
        val_max_size=cfg.val_max_size,
        hflip=cfg.hflip,
    )
    return CocoDataset(os.path.join(cfg.root, name), annotation_file(cfg.root, name), transforms, fix_hint(cfg))


def check_num_classes(dataset: CocoDataset, num_classes: int) -> None:
    """Labels are category ids (the original's convention), so every id must be < ``model.num_classes``."""
    ids = dataset.category_ids()
    if ids and max(ids) >= num_classes:
        raise DatasetError(
            f"{dataset.ann_file} has category ids up to {max(ids)} but model.num_classes is {num_classes}; "
            f"set model.num_classes={max(ids) + 1}"
        )


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Pads images bottom/right to the largest H and W in the batch.

    Returns ``images`` (B, 3, H, W) zero-padded, ``mask`` (B, H, W) bool with True = padding, and the targets.
    """
    images = [image for image, _ in batch]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    padded = images[0].new_zeros((len(images), 3, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        padded[i, :, :h, :w] = image
        mask[i, :h, :w] = False
    return padded, mask, [target for _, target in batch]


def build_loader(
    dataset: Dataset, *, batch_size: int, train: bool, num_workers: int, rank: int, world_size: int, seed: int
) -> DataLoader:
    """Shards ``dataset`` over ``world_size`` processes; training shuffles (per epoch, see :func:`set_epoch`) and
    drops the last incomplete batch, validation keeps every image (the sampler pads shards by repeating images)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
    if train and len(sampler) < batch_size:
        raise DatasetError(
            f"the training split has {len(dataset)} images, fewer than train.batch_size={batch_size} per process "
            f"x {world_size} process(es); lower train.batch_size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator(),
    )


def set_epoch(loader: DataLoader, epoch: int, seed: int, rank: int) -> None:
    """Makes the shuffle and the worker augmentation seeds a function of (seed, epoch, rank), so a resumed run
    replays the epochs it would have run."""
    loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(seed + 1000 * epoch + rank)
