"""Image sizes derived from the data (``data.image_size: auto``), so that one recipe fits data sets of other sizes.

The short side S at which images are trained and evaluated is chosen from the training split alone:

- large enough that a small box of the data (the 10th percentile of box side / image side, sides as geometric
  means) spans ``MIN_BOX_PX`` pixels, so that it covers a few cells of the finest feature map (stride 8);
- no larger than the median short side of the images (upsampling adds no detail);
- a multiple of 32 within ``data.min_image_size`` .. ``data.max_image_size`` (the compute budget), the minimum
  winning over the median.

From S follow the original's relations (``data.image_size: N`` sets S directly): training short sides from 0.75 S to
S in steps of 32, long sides at most 5/3 S (800 -> 1333 in the original), the random crop's scales and sizes
scaled from the original's 800-px values, and S itself for evaluation and inference.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from models.checkpoint import Checkpoint
from models.config import Config, ConfigError, DataConfig, override_list
from models.hf_preprocessor import chooses_resize
from models.loading import config_and_checkpoint

from .errors import DatasetError

MIN_BOX_PX = 32  # a small box spans this many pixels: 4 cells of the stride-8 map
STEP = 32
MAX_TO_SHORT = 1333 / 800  # the original's long-side cap over its short side
SMALL_BOX_QUANTILE = 0.1
SIZE_KEYS = ("train_scales", "train_max_size", "crop_scales", "crop_size", "val_size", "val_max_size")  # sizes_for's


def _round(value: float) -> int:
    return max(STEP, int(round(value / STEP)) * STEP)


def box_and_image_sides(coco: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(box side / image side per box, short side per image)`` of a COCO dict; sides are geometric means
    ``sqrt(w * h)`` (crowd and difficult boxes included: they are objects of the data too)."""
    images = {info["id"]: info for info in coco["images"]}
    relative = [
        math.sqrt(a["bbox"][2] * a["bbox"][3] / (images[a["image_id"]]["width"] * images[a["image_id"]]["height"]))
        for a in coco["annotations"]
    ]
    short = [min(info["width"], info["height"]) for info in coco["images"]]
    return np.asarray(relative, dtype=np.float64), np.asarray(short, dtype=np.float64)


def auto_image_size(coco: Mapping[str, Any], min_size: int, max_size: int) -> int:
    """The short side S for a training split's COCO dict (module docstring): a multiple of 32 in
    ``[min_size, max_size]``.

    Raises:
        ConfigError: no multiple of 32 lies in ``[min_size, max_size]`` (the keys named).
    """
    low, high = math.ceil(min_size / STEP) * STEP, math.floor(max_size / STEP) * STEP
    if low > high:
        raise ConfigError(
            f"config keys 'data.min_image_size' ({min_size}) and 'data.max_image_size' ({max_size}) leave no "
            f"multiple of {STEP} for data.image_size=auto to choose; the minimum must be at most the maximum"
        )
    relative, short = box_and_image_sides(coco)
    if not len(short):
        return low
    wanted = MIN_BOX_PX / float(np.quantile(relative, SMALL_BOX_QUANTILE)) if len(relative) else min_size
    up, down = math.ceil(wanted / STEP) * STEP, math.floor(float(np.median(short)) / STEP) * STEP
    return min(max(min(up, down), low), high)


def sizes_for(size: int) -> dict[str, Any]:
    """The ``data`` values for short side ``size``: training scales, long-side caps, crop, evaluation size."""
    low = _round(0.75 * size)
    scales = list(range(low, size + 1, STEP)) if low < size else [size]
    scale = size / 800  # the crop values are the original's for 800 px
    return {
        "train_scales": scales,
        "train_max_size": int(round(size * MAX_TO_SHORT)),
        "crop_scales": sorted({_round(v * scale) for v in (400, 500, 600)}),
        "crop_size": [_round(384 * scale), _round(600 * scale)],
        "val_size": size,
        "val_max_size": int(round(size * MAX_TO_SHORT)),
    }


def resolve_image_size(cfg: Config, train_coco: Mapping[str, Any] | None = None) -> tuple[Config, str]:
    """``cfg`` with ``data.image_size`` (``auto`` or a short side) turned into the sizes it implies, and a line that
    says what was chosen and why (empty when ``data.image_size`` is 0: the sizes are used as configured).

    ``train_coco`` is the training split's COCO dict; read from ``cfg.data`` when not given (annotations only).
    """
    data: DataConfig = cfg.data
    value = data.image_size
    if value == 0:
        return cfg, ""
    check_image_size(data)
    if value == "auto":
        if train_coco is None:
            from .layouts import read_split  # the readers; imported here to keep this module light

            train_coco = read_split(data, "train").coco
        size = auto_image_size(train_coco, data.min_image_size, data.max_image_size)
        relative, short = box_and_image_sides(train_coco)
        why = (
            f"data.image_size=auto -> {size} px (small boxes are {np.quantile(relative, SMALL_BOX_QUANTILE):.2f} of "
            f"the image side, median image short side {np.median(short):.0f} px, limits "
            f"{data.min_image_size}-{data.max_image_size}; override with data.image_size=N)"
            if len(relative)
            else f"data.image_size=auto -> {size} px (no boxes in the training split)"
        )
    else:
        size, why = _round(value), f"data.image_size={value} -> short side {_round(value)} px"
    resolved = dataclasses.replace(data, image_size=0, **sizes_for(size))
    return dataclasses.replace(cfg, data=resolved), why


def check_image_size(data: DataConfig) -> None:
    """Raises ConfigError when ``data.image_size`` cannot be resolved as it is set: a value other than 0, ``auto`` or
    a short side >= 32 (set in Python: a config read from a file or overrides refuses it already), or sizes set beside
    it that it would replace. Reads no data: training checks this before it generates or reads any."""
    value = data.image_size
    if value == 0:
        return
    if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool) and value >= STEP):
        raise ConfigError(f"config key 'data.image_size' must be 0, 'auto' or a short side >= {STEP}, got {value!r}")
    _refuse_sizes_set_beside(data)


def _refuse_sizes_set_beside(data: DataConfig) -> None:
    """``data.image_size`` derives the sizes of :func:`sizes_for`; one of them set to another value than its default
    would be replaced without a word, so it is refused, named."""
    defaults = DataConfig()
    changed = [f"data.{key}={getattr(data, key)}" for key in SIZE_KEYS if getattr(data, key) != getattr(defaults, key)]
    if changed:
        raise ConfigError(
            f"data.image_size={data.image_size} derives the training and evaluation sizes, and would replace "
            f"{', '.join(changed)}; set data.image_size=0 to use the sizes you give, or leave them out"
        )


def inference_size(cfg: Config, checkpoint: Checkpoint | None, overrides: Iterable[str] = ()) -> Config:
    """``cfg`` with ``data.image_size`` (a training option) turned into the resize that evaluation and inference
    apply (``data.val_size`` / ``data.val_max_size``), so that they resize as the model was trained: ``N`` -> its
    sizes; ``auto`` -> the sizes the checkpoint's training chose (its saved config), else chosen from the training
    split as training would (a warning when it cannot be read: the configured sizes are used). Sizes the overrides
    set win; ``data.image_size: 0`` leaves the sizes as they are."""
    if cfg.data.image_size == 0 or chooses_resize(overrides):
        return cfg
    saved = (checkpoint.config or {}).get("data", {}) if checkpoint is not None else {}
    if cfg.data.image_size == "auto" and saved.get("image_size", 0) == 0 and "val_size" in saved:
        max_size = saved.get("val_max_size", cfg.data.val_max_size)
        sizes = {"image_size": 0, "val_size": saved["val_size"], "val_max_size": max_size}
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **sizes))
    try:
        return resolve_image_size(cfg)[0]
    except (DatasetError, OSError) as exc:  # the data set is not here (a checkpoint of another machine's run)
        warnings.warn(
            f"data.image_size=auto cannot be resolved without the training split ({exc}): images are resized to "
            f"data.val_size={cfg.data.val_size}, data.val_max_size={cfg.data.val_max_size}; pass data.image_size=N "
            "or the checkpoint's own config",
            stacklevel=2,
        )
        return cfg


def inference_config(
    config: str | os.PathLike | None, overrides: Iterable[str], checkpoint: str | os.PathLike | None
) -> tuple[Config, Checkpoint | None]:
    """What eval, infer, visualize and ``Predictor`` start from: :func:`models.loading.config_and_checkpoint` (the
    checkpoint read, the config from ``config`` or from the checkpoint, ``overrides`` on top), its resize resolved as
    training resolved it (:func:`inference_size`)."""
    overrides = override_list(overrides)
    cfg, read = config_and_checkpoint(config, overrides, checkpoint)
    return inference_size(cfg, read, overrides), read
