"""The original's augmentation (boxes stay on their pixels), crowd/degenerate handling of targets, padding."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from deformable.data import coco_target, collate
from deformable.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, resized_shape
from models.config import DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {1: (230, 30, 30), 2: (30, 30, 230)}  # label -> RGB of its filled box


def original_get_size(image_size: tuple[int, int], size: int, max_size: int | None) -> tuple[int, int]:
    """The original's get_size_with_aspect_ratio (image_size is (w, h)), the oracle for resized_shape."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (427, 640), (800, 800), (333, 1000), (100, 3000)])
@pytest.mark.parametrize("size,max_size", [(800, 1333), (480, 1333), (608, None), (400, None)])
def test_resized_shape_matches_original(hw: tuple[int, int], size: int, max_size: int | None) -> None:
    h, w = hw
    assert resized_shape(h, w, size, max_size) == original_get_size((w, h), size, max_size)


def _sample() -> tuple[tv_tensors.Image, dict]:
    """A 120x160 grey image with a red box (label 1) and a blue box (label 2) painted on it."""
    image = torch.full((3, 120, 160), 128, dtype=torch.uint8)
    boxes = [[20, 15, 90, 75], [100, 50, 150, 110]]
    for (x0, y0, x1, y1), label in zip(boxes, (1, 2), strict=True):
        image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[label], dtype=torch.uint8)[:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(120, 160)
        ),
        "labels": torch.tensor([1, 2]),
        "image_id": torch.tensor([7]),
        "orig_size": torch.tensor([120, 160]),
    }
    return tv_tensors.Image(image), target


def _check_boxes_on_colour(image: torch.Tensor, target: dict) -> None:
    """Every normalised cxcywh box of ``target`` covers pixels of its label's colour in the normalised ``image``."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (image * std + mean) * 255
    h, w = image.shape[-2:]
    assert target["size"].tolist() == [h, w]
    assert target["boxes"].shape == (len(target["labels"]), 4)
    for box, label in zip(target["boxes"], target["labels"].tolist(), strict=True):
        cx, cy, bw, bh = (box * torch.tensor([w, h, w, h])).tolist()
        assert bw > 0 and bh > 0 and 0 <= cx - bw / 2 + 1e-3 and cx + bw / 2 <= w + 1e-3
        x0, x1 = int(cx - 0.3 * bw + 0.5), int(cx + 0.3 * bw + 0.5)
        y0, y1 = int(cy - 0.3 * bh + 0.5), int(cy + 0.3 * bh + 0.5)
        if x1 <= x0 or y1 <= y0:
            continue  # a sliver left by the crop: nothing to look at
        inside = rgb[:, y0:y1, x0:x1].reshape(3, -1).mean(1)
        assert torch.allclose(inside, torch.tensor(COLOURS[label], dtype=torch.float32), atol=25), (label, inside)


def _transforms(train: bool, crop: bool = True):
    sizes = dict(train_scales=[96, 128, 160], train_max_size=240, crop_scales=[100, 140], crop_size=[48, 110])
    data = DataConfig(**sizes, crop=crop, val_size=128, val_max_size=200, hflip=True)
    return build_transforms(data, train=train)


@pytest.mark.parametrize("seed", range(12))
def test_train_augmentation_keeps_boxes_on_their_pixels(seed: int) -> None:
    torch.manual_seed(seed)
    image, target = _transforms(train=True)(*_sample())
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert 96 <= min(image.shape[-2:]) <= 160 and max(image.shape[-2:]) <= 240
    assert target["image_id"].tolist() == [7] and target["orig_size"].tolist() == [120, 160]
    _check_boxes_on_colour(image, target)


def test_flip_and_crop_branches_both_happen() -> None:
    widths, counts = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = _transforms(train=True)(*_sample())
        widths.add(round(float(target["boxes"][0, 0]), 3))
        counts.add(len(target["labels"]))
    assert len(widths) > 5  # flips, resizes and crops move the first box around
    assert min(counts) < 2  # some crops drop a box, like the original


def test_val_transform_is_the_fixed_resize() -> None:
    image, target = _transforms(train=False)(*_sample())
    assert tuple(image.shape[-2:]) == resized_shape(120, 160, 128, 200) == (128, 170)
    _check_boxes_on_colour(image, target)


def test_coco_target_ignores_crowd_and_drops_degenerate_boxes() -> None:
    anns = [
        {"bbox": [10, 10, 20, 30], "category_id": 3, "iscrowd": 0},
        {"bbox": [5, 5, 10, 10], "category_id": 1, "iscrowd": 1},
        {"bbox": [50, 50, 0, 10], "category_id": 2},  # zero width
        {"bbox": [90, 70, 30, 30], "category_id": 5},  # partly outside: clipped to the 100x80 image
        {"bbox": [120, 10, 5, 5], "category_id": 4},  # fully outside: nothing left
    ]
    target = coco_target(anns, image_id=4, height=80, width=100)
    assert target["labels"].tolist() == [3, 5]
    assert target["boxes"].tolist() == [[10, 10, 30, 40], [90, 70, 100, 80]]
    assert target["image_id"].tolist() == [4] and target["orig_size"].tolist() == [80, 100]
    empty = coco_target([], image_id=5, height=8, width=8)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_collate_pads_bottom_right_with_a_mask() -> None:
    a = (torch.ones(3, 4, 6), {"labels": torch.tensor([1])})
    b = (torch.ones(3, 5, 3), {"labels": torch.tensor([2])})
    images, mask, targets = collate([a, b])
    assert images.shape == (2, 3, 5, 6) and mask.shape == (2, 5, 6) and mask.dtype == torch.bool
    assert not mask[0, :4, :6].any() and mask[0, 4:].all()
    assert not mask[1, :, :3].any() and mask[1, :, 3:].all()
    assert images[1, :, :, 3:].abs().sum() == 0 and [t["labels"].item() for t in targets] == [1, 2]
