"""The detection dataset every layout becomes: images read on demand, targets from the split's COCO dict.

Targets follow the original (ConvertCocoPolysToMask): crowd (and VOC difficult) boxes ignored, boxes clipped to the
image and degenerate ones dropped, the category id is the label, images without boxes kept.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import Any

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .decode import QUARTER_TURNS, checked_size, exif_orientation, read_rgb
from .errors import DatasetError
from .split import SplitData


def coco_api(coco: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` over an in-memory dict (what ``COCOeval`` scores against)."""
    api = COCO()
    api.dataset = coco
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        api.createIndex()
    return api


class DetectionDataset(Dataset):
    """One split of any layout. ``dataset[i]`` -> ``(image (3, H, W) float, target)`` after ``transforms``, with
    target keys ``boxes`` (n, 4) normalised cxcywh, ``labels`` (n,) int64 category ids, ``image_id`` (1,),
    ``orig_size`` and ``size`` (2,) as (h, w) before / after augmentation.

    ``coco`` is the pycocotools ``COCO`` of the split (boxes xywh pixels); ``ids`` the image ids in index order;
    ``layout``, ``split``, ``source`` (the file listing the split) and ``image_root`` say where it came from.
    """

    def __init__(self, data: SplitData, transforms: Callable[..., Any] | None) -> None:
        self.data = data
        self.transforms = transforms
        self.coco = coco_api(data.coco)
        self.ids = sorted(self.coco.imgs)
        # The annotation file's category id -> the id used now, where the ids were renumbered to a checkpoint's
        # (deformable.data.categories.align_to_checkpoint); empty while they are the file's.
        self.renumbered: dict[int, int] = {}

    @property
    def layout(self) -> str:
        return self.data.layout

    @property
    def split(self) -> str:
        return self.data.split

    @property
    def source(self) -> str:
        return self.data.source

    @property
    def image_root(self) -> str:
        return self.data.image_root

    def __len__(self) -> int:
        return len(self.ids)

    def category_ids(self) -> list[int]:
        """The split's category ids, sorted (labels are category ids)."""
        return sorted(self.coco.cats)

    def class_names(self) -> dict[int, str]:
        """Category id -> name."""
        return {cat_id: str(self.coco.cats[cat_id]["name"]) for cat_id in self.category_ids()}

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_root, self.coco.imgs[image_id]["file_name"])

    def load_image(self, image_id: int) -> tv_tensors.Image:
        """The image (3, H, W) uint8 RGB, upright (:func:`~deformable.data.decode.read_rgb`).

        Raises:
            DatasetError: the file cannot be read, or its size is not the one its annotations give (boxes would land
                elsewhere), naming the file.
        """
        pixels = read_rgb(self.image_path(image_id), name=self._image_name(image_id))
        self._check_size(image_id, pixels.shape[:2])
        return tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())

    def image_problem(self, image_id: int) -> str | None:
        """The message of the error :meth:`load_image` would raise for the image, None when it reads it; from the
        file's header where that shows the file whole (:func:`~deformable.data.decode.checked_size`), so a data set
        is checked before training (:mod:`~deformable.data.scan`) by the loader's own rules."""
        try:
            self._check_size(image_id, checked_size(self.image_path(image_id), self._image_name(image_id)))
        except DatasetError as exc:
            return str(exc)
        return None

    def _image_name(self, image_id: int) -> str:
        return f"{self.image_path(image_id)} (image id {image_id})"

    def _check_size(self, image_id: int, size: tuple[int, int]) -> None:
        """Refuses an upright ``size`` (h, w) other than the one the annotations give (where they give one)."""
        info = self.coco.imgs[image_id]
        expected = (info.get("height"), info.get("width"))
        if None in expected or tuple(size) == expected:
            return
        path = self.image_path(image_id)
        stated_by = self.data.size_sources.get(image_id, self.source)  # VOC: the image's XML, not the split list
        (height, width), (want_height, want_width) = size, expected
        fix = "the boxes were drawn on another version of the image; re-export the annotations or fix the image's "
        fix += "width/height there"
        orientation = exif_orientation(path) if expected == (width, height) else 1
        if orientation in QUARTER_TURNS:  # the stored size: a tool that ignores the EXIF orientation wrote it
            fix = (
                f"that is its size as stored, which its EXIF orientation ({orientation}) turns a quarter; if the "
                "boxes were drawn on the stored (sideways) image, save the image without the EXIF orientation; if "
                "on the upright image, correct the width/height there"
            )
        raise DatasetError(
            f"image {self._image_name(image_id)} is {width}x{height} (width x height, EXIF orientation applied) but "
            f"{stated_by} gives {want_width}x{want_height}: {fix}"
        )

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[index]
        image = self.load_image(image_id)
        annotations = self.coco.imgToAnns.get(image_id, [])
        target = coco_target(annotations, image_id, height=image.shape[-2], width=image.shape[-1])
        return (image, target) if self.transforms is None else self.transforms(image, target)


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
