"""``preprocessor_config.json``: the inference resize of a transformers Deformable DETR folder, written and read.

transformers' ``DeformableDetrImageProcessor`` (``AutoImageProcessor.from_pretrained``) reads it; this project's
tools resize by ``data.val_size`` / ``data.val_max_size``. :func:`preprocessor_config` writes those as the processor
expects them, and :func:`inference_size_from_hf` reads them back from any such file, refusing a resize or pixel
scaling the tools cannot apply.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .backbone import IMAGENET_MEAN, IMAGENET_STD
from .checkpoint import CheckpointError

# transformers' image processor settings (AutoImageProcessor.from_pretrained reads it): the inference resize.
PREPROCESSOR_NAME = "preprocessor_config.json"
IMAGE_PROCESSOR = "DeformableDetrImageProcessor"
RESCALE_FACTOR = 1 / 255  # the tools' ToModelInput scales 8-bit RGB to [0, 1] before normalising
# transformers' resize when preprocessor_config.json has no size (DeformableDetrImageProcessor's default).
HF_DEFAULT_SIZE = (800, 1333)


def _normalisation() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std every tool normalises with (the backbone's input normalisation)."""
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def preprocessor_config(val_size: int, val_max_size: int) -> dict[str, Any]:
    """``preprocessor_config.json`` for transformers' ``DeformableDetrImageProcessor``: the resize the tools apply
    at inference (short side ``val_size``, long side at most ``val_max_size``), 8-bit RGB scaled to [0, 1] and
    normalised with ImageNet's mean and std, batches padded at the bottom and right (with a pixel mask)."""
    mean, std = _normalisation()
    return {
        "image_processor_type": IMAGE_PROCESSOR,
        "format": "coco_detection",
        "do_resize": True,
        "size": {"shortest_edge": int(val_size), "longest_edge": int(val_max_size)},
        "resample": 2,  # PIL bilinear, as the tools' resize
        "do_rescale": True,
        "rescale_factor": RESCALE_FACTOR,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_pad": True,
        "do_convert_annotations": True,
    }


class UnsupportedResize(CheckpointError):
    """A ``preprocessor_config.json`` resize the tools cannot apply (``reason``: the file and what it says); passing
    ``data.val_size`` / ``data.val_max_size`` replaces it (:func:`models.loading.config_from_checkpoint`)."""

    def __init__(self, file: str, what: str) -> None:
        self.reason = f"{file}: {what}"
        super().__init__(
            f"{self.reason}; the tools keep the aspect ratio, short side data.val_size and long side at most "
            "data.val_max_size (size {shortest_edge, longest_edge}, or {max_height, max_width} with one value): "
            "pass data.val_size=N data.val_max_size=M to resize so, or edit the file"
        )


def _positive_int(value: Any, path: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedResize(path, f"{key} must be a whole number of pixels >= 1, got {value!r}")
    return value


def _check_pixels(config: Mapping[str, Any], path: str) -> None:
    """The tools scale to [0, 1] and normalise with ImageNet's statistics; a folder whose model expects other
    inputs would find other objects, so it is refused (transformers' defaults where a key is absent)."""
    mean, std = _normalisation()
    if not config.get("do_rescale", True):
        raise CheckpointError(f"{path}: do_rescale is false; the tools scale pixels by 1/255, as the model expects")
    factor = config.get("rescale_factor", RESCALE_FACTOR)
    if not isinstance(factor, (int, float)) or not math.isclose(factor, RESCALE_FACTOR, rel_tol=1e-3):
        raise CheckpointError(f"{path}: rescale_factor {factor!r} is not 1/255, which the tools scale pixels by")
    if not config.get("do_normalize", True):
        raise CheckpointError(f"{path}: do_normalize is false; the tools normalise with ImageNet's mean and std")
    for key, expected in (("image_mean", mean), ("image_std", std)):
        value = config.get(key, list(expected))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        numbers = isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)
        if not numbers or not all(math.isclose(v, e, abs_tol=1e-3) for v, e in zip(value, expected, strict=True)):
            raise CheckpointError(
                f"{path}: {key} {value!r} is not ImageNet's {list(expected)}, which the tools normalise with"
            )


RESIZE_OVERRIDES = ("data.val_size", "data.val_max_size")  # the overrides that choose the inference resize


def chooses_resize(overrides: Iterable[str]) -> bool:
    """Whether ``overrides`` set the inference resize (one of :data:`RESIZE_OVERRIDES`)."""
    return any(item.split("=", 1)[0].strip() in RESIZE_OVERRIDES for item in overrides)


def inference_size_from_hf(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(val_size, val_max_size)``: the inference resize that the ``preprocessor_config.json`` of a transformers
    folder (or beside its weights file) states; None when there is none.

    Read as ``DeformableDetrImageProcessor`` reads it: ``size`` ``{shortest_edge, longest_edge}``, or the older
    ``size: 800`` with ``max_size`` (1333 when absent); ``{max_height: S, max_width: S}`` (the long side scaled to
    S, as transformers' fine-tuning guide sets it) is ``(S, S)``: the same resize but for the original's rounding
    (within 2 px up to a 4:1 aspect ratio); no ``size``: transformers' default, 800 / 1333.

    Raises:
        UnsupportedResize (a CheckpointError): a resize the tools cannot apply (a fixed ``height`` x ``width``,
            ``max_height`` != ``max_width``, no resize at all), the file, key and value named.
        CheckpointError: unreadable JSON, a non-positive size, or other pixel scaling or normalisation than the
            tools'.
    """
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    file = os.path.join(folder, PREPROCESSOR_NAME)
    if not os.path.isfile(file):
        return None
    config = read_json_object(file, "transformers' image processor settings")
    _check_pixels(config, file)
    if not config.get("do_resize", True):
        raise UnsupportedResize(file, "do_resize is false (images fed at their own size)")
    size = config.get("size")
    if size is None:
        return HF_DEFAULT_SIZE
    if isinstance(size, int) and not isinstance(size, bool):
        max_size = config.get("max_size", HF_DEFAULT_SIZE[1])
        return _positive_int(size, file, "size"), _positive_int(max_size, file, "max_size")
    if isinstance(size, Mapping) and "shortest_edge" in size and "longest_edge" in size:
        short = _positive_int(size["shortest_edge"], file, "size.shortest_edge")
        return short, _positive_int(size["longest_edge"], file, "size.longest_edge")
    if isinstance(size, Mapping) and "max_height" in size and "max_width" in size:
        height = _positive_int(size["max_height"], file, "size.max_height")
        if _positive_int(size["max_width"], file, "size.max_width") == height:
            return height, height  # short side up to S, long side at most S: the long side becomes S
        raise UnsupportedResize(file, f"size {dict(size)!r} bounds height and width differently")
    raise UnsupportedResize(file, f"size {size!r} is not a resize the tools apply")


def read_json_object(path: str, expected: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a transformers folder's config.json or preprocessor_config.json).

    Raises:
        CheckpointError: unreadable, not JSON, or not an object; the message names the file and ``expected``.
    """
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); expected {expected}") from exc
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a JSON {type(content).__name__}, expected {expected} (an object)")
    return content
