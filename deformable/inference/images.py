"""Image files -> model input: listing, reading (clear errors naming the file), the validation resize/normalise.

The resize and normalisation are the validation transforms of :mod:`deformable.data.transforms` and the padding is
:func:`deformable.data.collate`, so a tool sees exactly what evaluation sees.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torchvision import tv_tensors

from deformable.data import DatasetError, build_transforms, collate
from deformable.data.decode import IMAGE_EXTENSIONS, read_rgb
from models.config import DataConfig


class ImageError(ValueError):
    """An image path that does not exist, is no image, or cannot be decoded; the message names the file."""


def list_images(inputs: Iterable[str]) -> list[str]:
    """Files, folders and glob patterns -> image files.

    A folder contributes its images (by extension, sorted, not recursive), leaving out hidden files (names starting
    with ``.``, such as the ``._photo.jpg`` metadata macOS writes beside copies); a pattern that names no file
    (``"photos/*.jpg"`` quoted, so the shell did not expand it) contributes the files it matches, sorted.

    Raises:
        ImageError: an input does not exist, or a folder or pattern holds no image.
    """
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and not name.startswith(".")
                and os.path.isfile(os.path.join(item, name))
            )
            if not found:
                raise ImageError(f"folder {item} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        elif any(c in item for c in "*?["):  # a glob pattern
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise ImageError(f"pattern {item} matches no image ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        else:
            raise ImageError(f"image {item} does not exist")
    return paths


def read_image(path: str) -> np.ndarray:
    """Reads ``path`` as ``(H, W, 3)`` uint8 RGB, upright, decoded as training and evaluation decode it
    (:func:`deformable.data.decode.read_rgb`: EXIF orientation applied, 16-bit scaled to 8).

    Raises:
        ImageError: the file is missing or cannot be decoded (the message names the file).
    """
    if not os.path.isfile(path):
        raise ImageError(f"image {path} does not exist")
    try:
        return read_rgb(path)
    except DatasetError as exc:
        raise ImageError(str(exc)) from exc


def _to_model_input(image: np.ndarray, data: DataConfig) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H', W')`` float, resized and normalised as for validation."""
    transform = build_transforms(
        train=False,
        train_scales=data.train_scales,
        train_max_size=data.train_max_size,
        crop=False,
        crop_scales=data.crop_scales,
        crop_size=data.crop_size,
        val_size=data.val_size,
        val_max_size=data.val_max_size,
        hflip=False,
    )
    height, width = image.shape[:2]
    tensor = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    return transform(tensor, target)[0]


def prepare_batch(images: Sequence[np.ndarray], data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images -> ``(B, 3, H, W)`` normalised, zero-padded bottom/right, and ``(B, H, W)`` mask (True = padding).

    Boxes the detector predicts for image i are relative to its own (unpadded) region, so multiplying them by the
    original ``(w, h)`` of image i gives its pixels whatever the padding.
    """
    samples = [(_to_model_input(image, data), {}) for image in images]
    padded, mask, _ = collate(samples)
    return padded, mask
