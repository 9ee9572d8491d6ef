"""Detection from Python (:class:`Predictor`) and what the tools build it from: a detector on a device with its
weights (``weights_only=True``), class names, one batched call.

    from deformable.inference import Predictor

    predictor = Predictor("runs/raccoon/checkpoint.pth")   # any checkpoint format tools/infer.py reads
    found = predictor("photo.jpg", threshold=0.5)          # a path, an array, a PIL image or a tensor
    for box, score, name in zip(found.boxes.tolist(), found.scores.tolist(), found.names):
        print(name, score, box)                            # box: (x0, y0, x1, y1) in the photo's pixels

The resize, normalisation, padding and post-processing are those of ``tools/infer.py`` and of evaluation, and both
keep the same detections (:func:`select_detections`), so a predictor returns what ``infer`` writes for the same image,
checkpoint and batch size. Both take one image at a time by default (:data:`DEFAULT_BATCH_SIZE`). A batch of several
images is padded to the largest of them, so the detections of a smaller image may change slightly with the images
beside it (the original DETR behaves the same way); the largest image of a batch is not padded.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import models
from deformable.data import dataset_class_names
from deformable.data.coco_eval import to_coco_results
from deformable.data.sizes import inference_config
from models import build_postprocessor
from models.checkpoint import Checkpoint
from models.config import Config, ConfigError, config_from_dict, override_list
from models.device import resolve_device

from .images import ImageInput, as_rgb, prepare_batch
from .video import batched, read_frames, video_info

# One image per forward pass, for Predictor and tools/infer.py alike: an image's detections then never depend on the
# other images given with it (padding in a batch moves them slightly), as with Ultralytics' and detectron2's
# predictors. A larger batch is faster on a GPU: pass batch_size (Predictor) or --batch-size (infer).
DEFAULT_BATCH_SIZE = 1


def load_detector(
    cfg: Config, checkpoint: str | Checkpoint | None, device: torch.device
) -> tuple[nn.Module, Checkpoint | None]:
    """The detector of ``cfg.model`` in eval mode on ``device`` with the weights of ``checkpoint`` (any format
    :func:`models.read_checkpoint` reads; it must fit ``cfg.model``, class count included).

    Without a checkpoint the weights are random (a warning says so): useful to debug the tools only. The backbone is
    never downloaded: the checkpoint holds it.
    """
    if checkpoint is None:
        warnings.warn("no checkpoint given: the detector is randomly initialised (debugging only)", stacklevel=2)
    model, checkpoint = models.load_detector(cfg, checkpoint)
    return model.to(device), checkpoint


def _categories(cfg: Config) -> dict[int, str]:
    """Category id -> name from the data set of ``cfg.data`` in any layout (or the synthetic shapes' list)."""
    return dataset_class_names(cfg.data)


def class_names(cfg: Config, checkpoint: Checkpoint | None = None) -> dict[int, str]:
    """Category id -> name: the checkpoint's own names (this project's checkpoints, transformers' ``id2label``, COCO
    for the original's), else those of the data set of its saved config, else of ``cfg``'s; empty when none is
    found (callers then show numeric ids)."""
    if checkpoint is not None and checkpoint.class_names:
        return dict(checkpoint.class_names)
    if checkpoint is not None and checkpoint.config is not None:
        try:
            names = _categories(config_from_dict(checkpoint.config))
        except ConfigError:
            names = {}
        if names:
            return names
    return _categories(cfg)


@torch.no_grad()
def detect(
    model: nn.Module, postprocessor: nn.Module, images: torch.Tensor, mask: torch.Tensor, sizes: torch.Tensor
) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """One batch: ``images (B, 3, H, W)``, ``mask (B, H, W)`` and original ``sizes (B, 2)`` as ``(h, w)``.

    Returns:
        ``(outputs, results)``: the model's outputs and, per image, ``scores (k,)``, ``labels (k,)`` and
        ``boxes (k, 4)`` xyxy in original image pixels (on the CPU).
    """
    device = next(model.parameters()).device
    outputs = model(images.to(device), mask.to(device))
    results = postprocessor(outputs, sizes.to(device))
    return outputs, [{k: v.cpu() for k, v in r.items()} for r in results]


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
        """COCO results entries: ``image_id`` (an integer, numpy's included, written as a Python int),
        ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``.

        Raises:
            TypeError: ``image_id`` is no integer (COCO image ids are).
        """
        if not isinstance(image_id, numbers.Integral) or isinstance(image_id, bool):
            raise TypeError(f"to_coco: image_id must be an integer (a COCO image id), got {type(image_id).__name__}")
        return to_coco_results(int(image_id), {"scores": self.scores, "labels": self.labels, "boxes": self.boxes})


@dataclass(frozen=True)
class VideoFrame:
    """One frame of a video and its detections (:meth:`Predictor.video`).

    Attributes:
        index: the frame's number in the video, from 0.
        time_s: its time in seconds (index over the frame rate the video states; None when it states none).
        image: ``(H, W, 3)`` uint8 RGB.
        detections: as :meth:`Predictor.__call__` returns them for ``image``.
    """

    index: int
    time_s: float | None
    image: np.ndarray
    detections: Detections


class Predictor:
    """A detector loaded once, for detection on many images.

    Args:
        checkpoint: any checkpoint format the tools read (this project's, an original release file, a bare
            state_dict, a transformers ``save_pretrained`` folder).
        config: a config file; by default the checkpoint's own (as ``tools/infer.py`` without CONFIG).
        overrides: ``section.key=value`` strings applied on top (e.g. ``"data.val_size=800"``).
        device: ``"auto"`` (a GPU when one is visible), ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or a
            ``torch.device``.
        threshold: the default score threshold of :meth:`__call__`.
        batch_size: images per forward pass (:data:`DEFAULT_BATCH_SIZE` by default). More than one is faster on a GPU
            but pads the smaller images of a batch, which may change their detections slightly.

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
        device: str | torch.device = "auto",
        threshold: float = 0.3,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        check_threshold(threshold, "Predictor: threshold")
        check_count(batch_size, "Predictor: batch_size")
        self.device = resolve_device(device)
        self.cfg, read = inference_config(config, override_list(overrides), checkpoint)
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
        check_threshold(threshold, "Predictor: threshold")
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

    def video(self, path: str | os.PathLike, threshold: float | None = None, stride: int = 1) -> Iterator[VideoFrame]:
        """Detects on every ``stride``-th frame of the video file ``path``, ``batch_size`` frames per forward pass;
        yields a :class:`VideoFrame` per frame, in order, as they are decoded (a long video is never held whole).

        Raises:
            ImageError: the video cannot be opened or decoded (naming the file). ValueError: ``stride`` < 1.
        """
        path = os.fspath(path)
        fps = video_info(path).fps
        for chunk in batched(read_frames(path, stride), self.batch_size):
            found = self([frame for _, frame in chunk], threshold)
            for (index, frame), detections in zip(chunk, found, strict=True):
                yield VideoFrame(index, index / fps if fps else None, frame, detections)

    def _detections(self, result: dict[str, torch.Tensor], threshold: float, size: tuple[int, int]) -> Detections:
        """One post-processed result -> :class:`Detections`: the scores at or above ``threshold`` and, where the
        checkpoint names its classes, the labels that are one of them (as ``tools/infer.py`` writes them)."""
        kept = select_detections(result, threshold, self.class_names)
        names = tuple(self.class_names.get(int(label), str(int(label))) for label in kept["labels"])
        return Detections(kept["boxes"].float(), kept["scores"].float(), kept["labels"], names, size)


def select_detections(
    result: Mapping[str, torch.Tensor], threshold: float, class_names: Mapping[int, str]
) -> dict[str, torch.Tensor]:
    """The detections of one post-processed result that a user is shown: score at or above ``threshold`` and, where
    the checkpoint names its classes (``class_names`` not empty), a label that is one of them (the unused class 0 of
    the original's convention is none). :class:`Predictor`, the results ``tools/infer.py`` writes and the boxes it
    draws all keep these, so that they agree."""
    keep = result["scores"] >= threshold
    if class_names:
        keep &= torch.isin(result["labels"], torch.tensor(sorted(class_names), dtype=result["labels"].dtype))
    return {key: value[keep] for key, value in result.items()}


def check_threshold(threshold: float, setting: str) -> None:
    """Refuses a score threshold outside ``[0, 1]`` (NaN included: no score is compared true with it), naming
    ``setting`` (``Predictor: threshold``, ``--score-threshold``)."""
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise TypeError(f"{setting} must be a number in [0, 1], got {type(threshold).__name__} {threshold!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{setting} must be a score in [0, 1], got {threshold}")


def check_count(value: int, setting: str) -> None:
    """Refuses anything but an integer >= 1 (a batch size, a frame stride, a number of detections drawn), naming
    ``setting`` (``Predictor: batch_size``, ``--batch-size``)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{setting} must be an integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{setting} must be >= 1, got {value}")
