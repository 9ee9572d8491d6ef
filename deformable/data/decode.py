"""Image files -> RGB pixels: the one decoder of training, evaluation and inference.

PIL decodes; the EXIF orientation is applied (a phone photo is read upright, in the frame annotation tools show and
label, as Ultralytics and detectron2 read it), and the size a layout reads from a file's header is that upright size
too, so boxes and pixels agree. 16-bit images are scaled to 8 bits (not clipped to white; 32-bit integer grey is
read as 8-bit values when they are within 0..255, as 16-bit ones up to 65535, refused beyond); palette images with a
transparent colour go through RGBA; an alpha channel is dropped. :func:`checked_size` tells, from the header where
it can, whether :func:`read_rgb` will read a file and at what size, so that a data set is checked before training.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError

# What layouts and tools look for: the formats Pillow reads without a plugin (.jfif: JPEG as some browsers save it;
# .mpo: a camera's JPEG with more pictures after the first; .avif and .jp2, as Ultralytics lists them).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".mpo", ".png", ".bmp", ".tif", ".tiff", ".webp", ".avif", ".jp2")
_ORIENTATION = 0x0112  # EXIF tag
QUARTER_TURNS = (5, 6, 7, 8)  # the EXIF orientations that swap width and height
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_THIRTY_TWO_BIT = "I"  # signed 32-bit grey (a 32-bit TIFF; PIL's convert("I")): its range is not stated
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
_JPEG_END = b"\xff\xd9"
_JPEG_PADDING = b"\x00\t\n\r "  # what some cameras and tools write after a JPEG's end marker (PIL reads past it)
_JPEG_TAIL = 4096  # bytes read from a JPEG's end to find the marker behind such padding
# PNG chunks that can carry an orientation (EXIF; XMP in iTXt; "Raw profile type exif" text), which PIL also reads
# after the pixels
_PNG_ORIENTATION_CHUNKS = (b"eXIf", b"iTXt", b"tEXt", b"zTXt")


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of the image file ``path`` as :func:`read_rgb` returns it (EXIF orientation applied), from
    its header alone (a TIFF, whose reader may report it turned already, is decoded).

    Raises:
        DatasetError: the file is missing or no image PIL can read (the message names it).
    """
    with _open(path, path) as picture:
        if picture.format not in _SELF_TURNING_FORMATS:
            return _upright_size(picture, header_exif=picture.format == "PNG" and _png_whole(path))
    height, width = read_rgb(path).shape[:2]  # a TIFF: as read_rgb returns it, however Pillow reports its header
    return height, width


# Formats whose reader may report the size with the EXIF orientation applied already (Pillow 13's TIFF reader does),
# so that the header's size cannot be turned as the others' is: their size is taken from the decoded image.
_SELF_TURNING_FORMATS = ("TIFF",)


def checked_size(path: str, name: str | None = None) -> tuple[int, int]:
    """``(height, width)`` of ``path`` as :func:`read_rgb` returns it, raising what :func:`read_rgb` raises, at the
    cost of a header read where the file is known whole (:func:`_whole`: a JPEG ending with its end marker, a PNG
    with its chunks up to IEND). Any other file (another format, a JPEG cut short, bytes after the end) is decoded
    as :func:`read_rgb` decodes it, so a file the loader reads is never refused. A JPEG or PNG that ends as it should
    but is corrupt inside passes (only a full decode would tell): the loader names it when it reads it.

    Raises:
        DatasetError: as :func:`read_rgb`, naming the image as ``name`` (the path by default).
    """
    name = path if name is None else name
    with _open(path, name) as picture:
        _check_pixels(picture.mode, name)
        if _whole(picture.format, path):
            return _upright_size(picture, header_exif=True)
    height, width = read_rgb(path, name).shape[:2]
    return height, width


def exif_orientation(path: str) -> int:
    """The EXIF orientation :func:`read_rgb` turns ``path`` by (1: none; 5-8 turn it a quarter); 1 when the file
    cannot be read."""
    try:
        with Image.open(path) as picture:
            return _orientation(picture, header_exif=picture.format == "PNG" and _png_whole(path))
    except _READ_ERRORS:
        return 1


def _upright_size(picture: Image.Image, header_exif: bool) -> tuple[int, int]:
    width, height = picture.size
    if _orientation(picture, header_exif) in QUARTER_TURNS:
        width, height = height, width
    return int(height), int(width)


def _orientation(picture: Image.Image, header_exif: bool) -> int:
    """The EXIF orientation ``ImageOps.exif_transpose`` reads. PIL's PNG reader decodes the pixels first, as an eXIf
    chunk may follow them; ``header_exif`` (a PNG :func:`_png_whole` passed: none follows) reads the header's."""
    exif = Image.Image.getexif(picture) if header_exif else picture.getexif()
    return exif.get(_ORIENTATION, 1)


def _whole(image_format: str | None, path: str) -> bool:
    """Whether ``path`` is known to end where its format says: a JPEG whose last bytes are its end marker FF D9
    (zero or whitespace padding after it allowed), or a PNG :func:`_png_whole` passes."""
    if image_format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with more pictures after the first
        with open(path, "rb") as f:
            f.seek(max(os.fstat(f.fileno()).st_size - _JPEG_TAIL, 0))
            return f.read().rstrip(_JPEG_PADDING).endswith(_JPEG_END)
    return image_format == "PNG" and _png_whole(path)


def _png_whole(path: str) -> bool:
    """Whether the PNG file ``path`` has its chunks up to IEND inside the file, with no chunk that can carry an
    orientation after the pixels (the header then holds the orientation)."""
    with open(path, "rb", buffering=0) as f:  # unbuffered: skipping a chunk reads nothing of it
        size = os.fstat(f.fileno()).st_size
        position, pixels = 8, False  # after the signature
        while position + 8 <= size:
            f.seek(position)
            length, kind = struct.unpack(">I4s", f.read(8))
            if kind == b"IEND":
                return position + 12 <= size
            if pixels and kind in _PNG_ORIENTATION_CHUNKS:
                return False
            pixels = pixels or kind == b"IDAT"
            position += 12 + length  # length, type, data, CRC
    return False


@contextlib.contextmanager
def _open(path: str, name: str) -> Iterator[Image.Image]:
    """``Image.open(path)``, an error opening or decoding it (in the ``with`` block) a DatasetError naming the image
    as ``name`` with the reason (an empty file said to be one)."""
    try:
        with Image.open(path) as picture:
            yield picture
    except _READ_ERRORS as exc:
        reason = str(exc)
        if isinstance(exc, UnidentifiedImageError):  # PIL's message repeats the path
            empty = os.path.getsize(path) == 0
            reason = "the file is empty (0 bytes)" if empty else "not an image file PIL can identify"
        raise DatasetError(f"cannot read image {name}: {reason}") from exc


def _grey_steps(grey: np.ndarray, mode: str, name: str) -> float:
    """What one step of 8-bit grey is in ``grey``'s values: 257 for 16-bit grey (0..65535 onto 0..255, as OpenCV
    reads it); for 32-bit integer grey (``"I"``), whose range no format states, 1 when its values are within 0..255
    (an 8-bit image PIL converted to ``"I"``, or saved from it) and 257 when they are within 0..65535.

    Raises:
        DatasetError: 32-bit values outside 0..65535, whose scale cannot be told (the message names the image and
            range).
    """
    if mode != _THIRTY_TWO_BIT:
        return 257.0
    low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise DatasetError(
            f"cannot read image {name}: 32-bit integer pixels from {low:.0f} to {high:.0f}, outside the 8- and 16-bit "
            "ranges (0..255, 0..65535), so their brightness scale is unknown; save it with 8 or 16 bits per channel"
        )
    return 1.0 if high <= 255 else 257.0


def _check_pixels(mode: str, name: str) -> None:
    if mode == "F":
        raise DatasetError(f"cannot read image {name}: 32-bit floating-point pixels; save it with 8 bits per channel")


def read_rgb(path: str, name: str | None = None) -> np.ndarray:
    """The image file ``path`` as ``(H, W, 3)`` uint8 RGB, upright (EXIF orientation applied).

    Raises:
        DatasetError: the file is missing, truncated or no image PIL can decode, or holds floating-point pixels; the
            message names the image as ``name`` (the path by default) and gives the reason.
    """
    name = path if name is None else name
    with _open(path, name) as picture:
        ImageOps.exif_transpose(picture, in_place=True)  # no copy when there is nothing to turn
        return _rgb(picture, name)


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
    if picture.mode in _SIXTEEN_BIT or picture.mode == _THIRTY_TWO_BIT:
        grey = np.asarray(picture, dtype=np.float64)
        grey = (grey / _grey_steps(grey, picture.mode, name)).round().clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    _check_pixels(picture.mode, name)
    if picture.mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")  # PIL's way for palette transparency (and without its warning)
    return np.array(picture.convert("RGB"))
