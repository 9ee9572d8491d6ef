"""Detection from Python: :class:`Predictor` loads a detector once and detects on images of any usual kind.

    from deformable.inference import Predictor

    predictor = Predictor("runs/raccoon/checkpoint.pth")   # any checkpoint format tools/infer.py reads
    found = predictor("photo.jpg", threshold=0.5)          # a path, an array, a PIL image or a tensor
    for box, score, name in zip(found.boxes.tolist(), found.scores.tolist(), found.names):
        print(name, score, box)                            # box: (x0, y0, x1, y1) in the photo's pixels

The resize, normalisation, padding and post-processing are those of ``tools/infer.py`` and of evaluation, so a
predictor returns what ``infer`` writes for the same image and checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from deformable.data.coco_eval import to_coco_results
from models import build_postprocessor
from models.device import resolve_device
from models.loading import config_and_checkpoint

from .images import ImageError, prepare_batch, read_image
from .predictor import class_names, detect, load_detector

# One image as the predictor takes it (see :func:`as_rgb`).
ImageInput = str | os.PathLike | np.ndarray | Image.Image | torch.Tensor


@dataclass(frozen=True)
class Detections:
    """One image's detections at or above the threshold, highest score first.

    Attributes:
        boxes: ``(k, 4)`` float32 ``(x0, y0, x1, y1)`` in the pixels of the image as given (not clipped to it).
        scores: ``(k,)`` float32 in ``[0, 1]``.
        labels: ``(k,)`` int64 category ids: the ids of the checkpoint's data set (COCO ids for COCO weights).
        names: ``k`` class names (the id as text where the checkpoint names no classes).
        image_size: ``(height, width)`` of the image.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_coco(self, image_id: int) -> list[dict]:
        """COCO results entries: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``."""
        return to_coco_results(image_id, {"scores": self.scores, "labels": self.labels, "boxes": self.boxes})


def as_rgb(image: ImageInput, where: str = "image") -> np.ndarray:
    """One image -> ``(H, W, 3)`` uint8 RGB.

    Accepted: a file path; a ``PIL.Image`` (any mode, converted to RGB); a uint8 numpy array ``(H, W)``, ``(H, W, 1)``,
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
        return np.array(image.convert("RGB"))  # a writable copy
    if isinstance(image, torch.Tensor):
        return _tensor_to_rgb(image, where)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, where)
    raise ImageError(
        f"{where}: expected a path, a numpy array, a PIL image or a torch tensor, got {type(image).__name__}"
    )


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
    return np.ascontiguousarray(array[:, :, :3])


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


class Predictor:
    """A detector loaded once, for detection on many images.

    Args:
        checkpoint: any checkpoint format the tools read (this project's, an original release file, a bare
            state_dict, a transformers ``save_pretrained`` folder).
        config: a config file; by default the checkpoint's own (as ``tools/infer.py`` without CONFIG).
        overrides: ``section.key=value`` strings applied on top (e.g. ``"data.val_size=800"``).
        device: ``"auto"`` (a GPU when one is visible), ``"cpu"`` or ``"cuda"``.
        threshold: the default score threshold of :meth:`__call__`.
        batch_size: images per forward pass.

    Raises:
        FileNotFoundError, models.CheckpointError, models.config.ConfigError: as the tools do, naming the file or
        option.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        config: str | os.PathLike | None = None,
        overrides: Iterable[str] = (),
        *,
        device: str = "auto",
        threshold: float = 0.3,
        batch_size: int = 4,
    ) -> None:
        _check_threshold(threshold)
        if batch_size < 1:
            raise ValueError(f"Predictor: batch_size must be >= 1, got {batch_size}")
        self.cfg, read = config_and_checkpoint(config, list(overrides), checkpoint)
        self.device = resolve_device(device)
        self.model, self.checkpoint = load_detector(self.cfg, read, self.device)
        self.postprocessor = build_postprocessor(self.cfg)
        self.class_names = class_names(self.cfg, self.checkpoint)  # category id -> name; empty when unknown
        self.threshold = threshold
        self.batch_size = batch_size

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], threshold: float | None = None
    ) -> Detections | list[Detections]:
        """Detects on one image (returns :class:`Detections`) or a list of images (returns a list).

        Args:
            images: what :func:`as_rgb` accepts, or a list or tuple of those.
            threshold: the lowest score kept; the predictor's ``threshold`` by default.
        """
        threshold = self.threshold if threshold is None else threshold
        _check_threshold(threshold)
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        found: list[Detections] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch = [as_rgb(item, f"image {start + i}") for i, item in enumerate(chunk)]
            sizes = torch.tensor([picture.shape[:2] for picture in batch])
            _, results = detect(self.model, self.postprocessor, *prepare_batch(batch, self.cfg.data), sizes)
            found += [self._detections(r, threshold, tuple(p.shape[:2])) for r, p in zip(results, batch, strict=True)]
        return found[0] if single else found

    def _detections(self, result: dict[str, torch.Tensor], threshold: float, size: tuple[int, int]) -> Detections:
        """One post-processed result -> :class:`Detections`: the scores at or above ``threshold`` and, where the
        checkpoint names its classes, the labels that are one of them (as ``tools/infer.py`` writes them)."""
        keep = result["scores"] >= threshold
        if self.class_names:
            keep &= torch.isin(result["labels"], torch.tensor(sorted(self.class_names)))
        labels = result["labels"][keep]
        names = tuple(self.class_names.get(int(label), str(int(label))) for label in labels)
        return Detections(result["boxes"][keep].float(), result["scores"][keep].float(), labels, names, size)


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"Predictor: threshold must be a score in [0, 1], got {threshold}")
