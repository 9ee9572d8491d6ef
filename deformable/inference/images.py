"""Images -> model input: listing and reading files (clear errors naming the file), images of any kind as RGB
arrays (:func:`as_rgb`), the validation resize/normalise.

The resize and normalisation are the validation transforms of :mod:`deformable.data.transforms` and the padding is
:func:`deformable.data.collate`, so a tool sees exactly what evaluation sees.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from deformable.data import DatasetError, build_transforms, collate
from deformable.data.decode import IMAGE_EXTENSIONS, pil_to_rgb, read_rgb
from deformable.data.split import is_hidden
from models.config import DataConfig

# One image as :class:`~deformable.inference.predictor.Predictor` takes it (see :func:`as_rgb`).
ImageInput = str | os.PathLike | np.ndarray | Image.Image | torch.Tensor


class ImageError(ValueError):
    """An image path that does not exist, is no image, or cannot be decoded; the message names the file."""


def list_images(inputs: Iterable[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """Files, folders and glob patterns -> the files to detect on: images, or whatever ``extensions`` names
    (``tools/infer.py`` adds videos).

    A folder contributes its files with one of ``extensions`` (sorted, not recursive), leaving out hidden files
    (names starting with ``.``, such as the ``._photo.jpg`` metadata macOS writes beside copies); a pattern that
    names no file (``"photos/*.jpg"`` quoted, so the shell did not expand it) contributes the files it matches,
    sorted; ``**`` in a pattern matches any depth of subfolders (``"photos/**/*"`` takes a tree). A file named is
    taken whatever its extension (reading it says what it is).

    Raises:
        ImageError: an input does not exist, or a folder or pattern holds no such file.
    """
    kind = "image" if extensions == IMAGE_EXTENSIONS else "image or video"
    paths: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, name)
                for name in os.listdir(item)
                if name.lower().endswith(extensions)
                and not is_hidden(name)
                and os.path.isfile(os.path.join(item, name))
            )
            if not found:
                nested = (
                    ""
                    if not _found_below(item, extensions)
                    else (
                        f"; its subfolders do: pass the pattern {os.path.join(item, '**', '*')!r} (quoted) to take them"
                    )
                )
                raise ImageError(f"folder {item} holds no {kind} ({', '.join(extensions)}){nested}")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        elif any(c in item for c in "*?["):  # a glob pattern
            found = sorted(
                p for p in glob.glob(item, recursive=True) if os.path.isfile(p) and p.lower().endswith(extensions)
            )
            if not found:
                raise ImageError(f"pattern {item} matches no {kind} ({', '.join(extensions)})")
            paths.extend(found)
        else:
            what = "image" if kind == "image" or item.lower().endswith(IMAGE_EXTENSIONS) else "input"
            raise ImageError(f"{what} {item} does not exist")
    return paths


def _found_below(folder: str, extensions: tuple[str, ...]) -> bool:
    """Whether a subfolder of ``folder`` (any depth, hidden ones left out) holds a file with one of ``extensions``."""
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        if any(f.lower().endswith(extensions) and not is_hidden(f) for f in files):
            return True
    return False


def read_image(path: str) -> np.ndarray:
    """Reads ``path`` as ``(H, W, 3)`` uint8 RGB, upright, decoded as training and evaluation decode it
    (:func:`deformable.data.decode.read_rgb`: EXIF orientation applied, 16-bit scaled to 8).

    Raises:
        ImageError: the file is missing or cannot be decoded (the message names the file).
    """
    if os.path.isdir(path):
        raise ImageError(f"image {path} is a folder, not an image file")
    if not os.path.isfile(path):
        raise ImageError(f"image {path} does not exist")
    try:
        return read_rgb(path)
    except DatasetError as exc:
        raise ImageError(str(exc)) from exc


def as_rgb(image: ImageInput, where: str = "image") -> np.ndarray:
    """One image -> ``(H, W, 3)`` uint8 RGB.

    Accepted: a file path; a ``PIL.Image`` (any mode, read as a file is: EXIF orientation applied, 16-bit scaled to
    8 bits, alpha dropped; the image given is left as it is); a uint8 numpy array ``(H, W)``, ``(H, W, 1)``,
    ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA (alpha dropped; an OpenCV image is BGR: convert it with
    ``cv2.cvtColor(image, cv2.COLOR_BGR2RGB)``); a torch tensor ``(3, H, W)`` or ``(1, H, W)``, uint8 or float in
    ``[0, 1]`` (torchvision's convention).

    Raises:
        ImageError: a missing or undecodable file, or an array of another shape, dtype or range; ``where`` names the
            image in the message.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(os.fspath(image))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, where)
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(image, where)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, where)
    raise ImageError(
        f"{where}: expected a path, a numpy array, a PIL image or a torch tensor, got {type(image).__name__}"
    )


def _pil_to_rgb(image: Image.Image, where: str) -> np.ndarray:
    """A PIL image -> RGB exactly as :func:`read_image` decodes its file: the same orientation and conversion code
    (:mod:`deformable.data.decode`), so ``Image.open(path)`` and ``path`` give the same pixels (a plain
    ``convert("RGB")`` would turn a 16-bit image white and a phone photo on its side)."""
    if min(image.size) < 1:
        raise ImageError(f"{where}: a PIL image of size {image.size[0]}x{image.size[1]} (width x height) has no pixels")
    try:
        return pil_to_rgb(image, where)
    except DatasetError as exc:  # floating-point pixels, a truncated file
        raise ImageError(str(exc)) from exc


def _array_to_rgb(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageError(
            f"{where}: a numpy image must be uint8 (H, W, 3) RGB, got dtype {array.dtype}; scale it to 0..255 and "
            "cast with .astype(np.uint8)"
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageError(f"{where}: a numpy image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    rgb = np.ascontiguousarray(array[:, :, :3])
    return rgb if rgb.flags.writeable else rgb.copy()  # np.asarray(pil_image) is read-only; torch warns on those


def _tensor_to_rgb(tensor: torch.Tensor, where: str) -> np.ndarray:
    if tensor.dim() != 3 or tensor.shape[0] not in (1, 3) or min(tensor.shape[1:]) < 1:
        raise ImageError(f"{where}: a tensor image must be (3, H, W) or (1, H, W), got {tuple(tensor.shape)}")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        low, high = float(tensor.min()), float(tensor.max())
        if not (low >= 0.0 and high <= 1.0):  # also NaN
            raise ImageError(f"{where}: a float tensor image must lie in [0, 1], got values in [{low}, {high}]")
        tensor = (tensor * 255).round().to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise ImageError(f"{where}: a tensor image must be uint8 or float in [0, 1], got {tensor.dtype}")
    return np.ascontiguousarray(tensor.expand(3, -1, -1).permute(1, 2, 0).numpy())


def _to_model_input(image: np.ndarray, data: DataConfig) -> torch.Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H', W')`` float, resized and normalised as for validation."""
    transform = build_transforms(data, train=False)
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
