"""Image files -> RGB pixels: the one decoder of training, evaluation and inference.

PIL decodes; the EXIF orientation is applied (a phone photo is read upright, in the frame annotation tools show and
label, as Ultralytics and detectron2 read it), and the size a layout reads from a file's header is that upright size
too, so boxes and pixels agree. 16-bit images are scaled to 8 bits (not clipped to white); palette images with a
transparent colour go through RGBA; an alpha channel is dropped.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from .errors import DatasetError

# What layouts and tools look for (.jfif: JPEG as some browsers save it).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp")
_ORIENTATION = 0x0112  # EXIF tag; values 5-8 turn the image a quarter, swapping width and height
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of the image file ``path`` as :func:`read_rgb` returns it (EXIF orientation applied), from
    its header alone.

    Raises:
        DatasetError: the file is missing or no image PIL can read (the message names it).
    """
    try:
        with Image.open(path) as picture:
            width, height = picture.size
            if picture.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except _READ_ERRORS as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from exc
    return int(height), int(width)


def read_rgb(path: str, name: str | None = None) -> np.ndarray:
    """The image file ``path`` as ``(H, W, 3)`` uint8 RGB, upright (EXIF orientation applied).

    Raises:
        DatasetError: the file is missing, truncated or no image PIL can decode, or holds floating-point pixels; the
            message names the image as ``name`` (the path by default) and gives the reason.
    """
    name = path if name is None else name
    try:
        with Image.open(path) as picture:
            ImageOps.exif_transpose(picture, in_place=True)  # no copy when there is nothing to turn
            return _rgb(picture, name)
    except _READ_ERRORS as exc:
        raise DatasetError(f"cannot read image {name}: {exc}") from exc


def pil_to_rgb(picture: Image.Image, name: str = "image") -> np.ndarray:
    """An opened PIL image as ``(H, W, 3)`` uint8 RGB, decoded as :func:`read_rgb` decodes its file (EXIF orientation
    applied, on a copy: the image given is not changed), so ``Image.open(path)`` and ``path`` give the same pixels.

    Raises:
        DatasetError: as :func:`read_rgb`, naming the image as ``name``.
    """
    try:
        return _rgb(ImageOps.exif_transpose(picture), name)
    except DatasetError:
        raise
    except _READ_ERRORS as exc:  # an opened file that turns out truncated or undecodable
        raise DatasetError(f"cannot read image {name}: {exc}") from exc


def _rgb(picture: Image.Image, name: str) -> np.ndarray:
    """A decoded PIL image of any mode -> ``(H, W, 3)`` uint8 RGB."""
    if picture.mode in _SIXTEEN_BIT:  # 16-bit grey: 0..65535 onto 0..255, as OpenCV reads it
        grey = (np.asarray(picture, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if picture.mode == "F":
        raise DatasetError(f"cannot read image {name}: 32-bit floating-point pixels; save it with 8 bits per channel")
    if picture.mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")  # PIL's way for palette transparency (and without its warning)
    return np.array(picture.convert("RGB"))
