"""The original's detection augmentation on ``transforms.v2`` with ``tv_tensors``.

A sample is ``(image, target)``: ``image`` a ``tv_tensors.Image`` (3, H, W) uint8, ``target`` a dict whose ``boxes`` is
a ``tv_tensors.BoundingBoxes`` (n, 4) in absolute XYXY pixels and whose ``labels`` (n,) int64 follow the boxes. v2
transforms move the boxes with the image; :class:`RandomSizeCrop` and :class:`ToModelInput` drop the boxes (and their
labels) that a crop reduced to nothing, like the original. Randomness comes from the torch RNG, so a seed (and the
RNG state saved in checkpoints) reproduces the augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from models.backbone import IMAGENET_MEAN, IMAGENET_STD  # the backbone's input normalisation
from models.config import DataConfig

Sample = tuple[tv_tensors.Image, dict[str, Any]]


def resized_shape(height: int, width: int, size: int, max_size: int | None) -> tuple[int, int]:
    """The original's ``get_size_with_aspect_ratio``: the shorter side becomes ``size`` unless the longer side would
    exceed ``max_size``, in which case the shorter side shrinks to fit, never below 1 pixel (an image more than
    ``max_size`` times longer than wide keeps a 1-pixel short side and exceeds the cap). Returns ``(new_h, new_w)``."""
    if max_size is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > max_size:
            size = max(1, int(round(max_size * short / long)))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _keep_boxes(target: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """Drops the boxes (and their labels) where ``keep`` (n,) is False."""
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = tv_tensors.wrap(boxes[keep], like=boxes)
    target["labels"] = target["labels"][keep]
    return target


class RandomResize(v2.Transform):
    """Resizes the shorter side to a size drawn uniformly from ``sizes``, the longer side capped at ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.sizes[int(torch.randint(len(self.sizes), ())) if len(self.sizes) > 1 else 0]
        return {"shape": resized_shape(height, width, size, self.max_size)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, list(params["shape"]))


class RandomSizeCrop(v2.Transform):
    """Crops a random ``(h, w)`` window, h and w drawn uniformly from ``[min_size, min(side, max_size)]``.

    Boxes are clipped to the window; the caller drops the empty ones (:func:`drop_empty_boxes`).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _draw(self, side: int) -> int:
        high = min(side, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self._draw(height), self._draw(width)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def drop_empty_boxes(sample: Sample) -> Sample:
    """Removes boxes whose width or height is not positive (the original's rule after a crop)."""
    image, target = sample
    boxes = target["boxes"]
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if bool(keep.all()):
        return image, target
    return image, _keep_boxes(target, keep)


class CropAndDrop(v2.Transform):
    """:class:`RandomSizeCrop` followed by :func:`drop_empty_boxes`, as one step of a v2 pipeline."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.crop = RandomSizeCrop(min_size, max_size)

    def forward(self, *inputs: Any) -> Any:
        return drop_empty_boxes(self.crop(*inputs))


class ToModelInput(v2.Transform):
    """uint8 image -> float ImageNet-normalised (3, H, W); boxes -> (n, 4) cxcywh normalised by the image size.

    Also sets ``target["size"]`` = (H, W) after augmentation, as the original.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def forward(self, *inputs: Any) -> Any:
        image, target = drop_empty_boxes(inputs if len(inputs) > 1 else inputs[0])
        height, width = image.shape[-2:]
        boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = dict(target)
        target["boxes"] = boxes.as_subclass(torch.Tensor).float() / scale
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return self.normalize(image).as_subclass(torch.Tensor), target


def build_transforms(cfg: DataConfig, train: bool) -> v2.Compose:
    """The original's ``make_coco_transforms``, with the sizes and switches of ``cfg`` (the config's ``data``):
    what training applies (``train``), and evaluation and inference (not ``train``).

    Train: horizontal flip (p=0.5; ``hflip``), then with p=0.5 either a resize of the shorter side to one of
    ``train_scales`` (longer side <= ``train_max_size``) or (``crop``) the DETR crop branch: resize to one of
    ``crop_scales``, random crop of ``crop_size = [min, max]``, resize to one of ``train_scales``. Validation: shorter
    side ``val_size``, longer side <= ``val_max_size``. Both end with :class:`ToModelInput`.
    """
    if not train:
        return v2.Compose([RandomResize([cfg.val_size], max_size=cfg.val_max_size), ToModelInput()])
    steps: list[Any] = [v2.RandomHorizontalFlip(p=0.5)] if cfg.hflip else []
    resize = RandomResize(cfg.train_scales, max_size=cfg.train_max_size)
    if cfg.crop:
        if len(cfg.crop_size) != 2:
            raise ValueError(f"data.crop_size must be [min, max], got {list(cfg.crop_size)}")
        crop_branch = v2.Compose(
            [
                RandomResize(cfg.crop_scales),
                CropAndDrop(cfg.crop_size[0], cfg.crop_size[1]),
                RandomResize(cfg.train_scales, max_size=cfg.train_max_size),
            ]
        )
        steps.append(v2.RandomChoice([resize, crop_branch], p=[0.5, 0.5]))
    else:
        steps.append(resize)
    steps.append(ToModelInput())
    return v2.Compose(steps)
