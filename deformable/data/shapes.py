"""A small synthetic detection data set of coloured shapes, written in the COCO layout.

``root/train2017/*.jpg``, ``root/val2017/*.jpg``, ``root/annotations/instances_{train2017,val2017}.json``: the
same files the COCO pipeline reads, so the demo exercises exactly the code that trains on COCO. Three classes:
circles, axis-aligned squares and triangles (pointing up or down), each in its own two hues with random shading, on
a random dark or light background with noise. Colour and shape both tell the class, which keeps the task learnable
by a small model trained from scratch on two CPU cores in minutes. Shapes overlap little, and each box is the tight
box of the drawn pixels. Generation is deterministic for a given seed.

A generated folder holds a :data:`MARKER` file with the parameters; only folders with it are ever regenerated
(when the parameters change), and a folder without it is never written into.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import cv2
import numpy as np

from deformable.data.coco import write_coco_split
from deformable.data.errors import DatasetError
from models.config import ConfigError, DataConfig
from models.files import staging_dir

CATEGORIES = ["circle", "square", "triangle"]  # category ids 1..3, so model.num_classes = 4
HUES = {
    "circle": [(220, 40, 40), (235, 130, 30)],
    "square": [(40, 170, 60), (40, 190, 200)],
    "triangle": [(50, 80, 225), (190, 60, 200)],
}  # RGB
MAX_OVERLAP = 0.2  # intersection over the smaller box
MARKER = ".deformable-synthetic"  # written into every generated folder: only such folders are ever regenerated


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection area over the smaller area of two xyxy boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(iw * ih / smaller)


def _polygon(kind: str, cx: float, cy: float, r: float, flip: bool) -> np.ndarray:
    """Vertices (k, 2) in pixels of a square (half side 0.85 r) or a triangle (2r wide, 1.8r tall, upside down when
    ``flip``) centred on (cx, cy)."""
    if kind == "square":
        h = 0.85 * r
        return np.array([[cx - h, cy - h], [cx + h, cy - h], [cx + h, cy + h], [cx - h, cy + h]])
    sign = -1.0 if flip else 1.0
    return np.array([[cx, cy - sign * 0.9 * r], [cx + r, cy + sign * 0.9 * r], [cx - r, cy + sign * 0.9 * r]])


def _draw(canvas: np.ndarray, kind: str, cx: float, cy: float, r: float, flip: bool, colour: np.ndarray) -> np.ndarray:
    """Draws one filled shape on ``canvas`` (H, W, 3) RGB; returns its pixel mask (H, W) bool."""
    mask = np.zeros(canvas.shape[:2], dtype=np.uint8)
    shift = 4  # sub-pixel precision for cv2
    if kind == "circle":
        cv2.circle(mask, (round(cx * 16), round(cy * 16)), round(r * 16), 255, -1, cv2.LINE_8, shift)
    else:
        points = np.round(_polygon(kind, cx, cy, r, flip) * 16).astype(np.int32)
        cv2.fillPoly(mask, [points], 255, cv2.LINE_8, shift)
    canvas[mask > 0] = colour
    return mask > 0


def _colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One of the class's hues, shaded by a random factor in [0.8, 1.1]."""
    hue = np.array(HUES[kind][int(rng.integers(len(HUES[kind])))], dtype=np.float64)
    return np.clip(hue * rng.uniform(0.8, 1.1), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.integers(20, 70) if rng.random() < 0.5 else rng.integers(170, 235)
    tint = rng.integers(-15, 16, size=3)
    canvas = np.full((height, width, 3), base, dtype=np.int16) + tint
    canvas += rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _image(rng: np.random.Generator, image_size: int, max_objects: int) -> tuple[np.ndarray, list[tuple]]:
    """One image (H, W, 3) BGR and its objects as ``(category id, (x0, y0, x1, y1), pixel area)``; H and W are drawn
    in [0.75, 1] x image_size."""
    height, width = (int(rng.integers(int(0.75 * image_size), image_size + 1)) for _ in range(2))
    canvas = _background(rng, height, width)
    placed: list[np.ndarray] = []
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            r = rng.uniform(0.08, 0.22) * min(height, width)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            box = np.array([cx - r, cy - r, cx + r, cy + r])
            if all(_overlap(box, other) <= MAX_OVERLAP for other in placed):
                break
        else:
            continue
        label = int(rng.integers(len(CATEGORIES)))
        kind = CATEGORIES[label]
        mask = _draw(canvas, kind, cx, cy, r, bool(rng.integers(2)), _colour(rng, kind))
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        placed.append(box)
        objects.append(
            (label + 1, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), int(mask.sum()))
        )
    return cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), objects


def _write_split(root: str, split: str, count: int, image_size: int, max_objects: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 0 if split.startswith("train") else 1])
    samples = (_image(rng, image_size, max_objects) for _ in range(count))
    write_coco_split(root, split, samples, CATEGORIES, "shape", f"synthetic shapes, seed {seed}")


def read_marker(root: str) -> dict[str, Any] | None:
    """The parameters recorded in ``root``'s :data:`MARKER` file; None when ``root`` has no (readable) marker, i.e.
    when this module did not generate it."""
    try:
        with open(os.path.join(root, MARKER), encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def make_shapes(
    root: str,
    *,
    train_images: int,
    val_images: int,
    image_size: int,
    max_objects: int,
    seed: int = 0,
    train_split: str = "train2017",
    val_split: str = "val2017",
    replace: bool = False,
) -> None:
    """Writes the data set into ``root`` with a :data:`MARKER` file recording the parameters, atomically: a sibling
    temporary folder is filled and then renamed, so an interrupted generation leaves nothing behind.

    ``root`` must not exist, except with ``replace`` when it holds a data set this function generated (it has the
    marker): that one is swapped for the new one. Any other existing folder is never touched.

    Raises:
        FileExistsError: ``root`` exists (without ``replace``, or without the marker).
    """
    params = {
        "generator": "deformable.data.shapes",
        "train_images": train_images,
        "val_images": val_images,
        "image_size": image_size,
        "max_objects": max_objects,
        "seed": seed,
        "train_split": train_split,
        "val_split": val_split,
    }
    if os.path.exists(root) and not (replace and read_marker(root) is not None):
        raise FileExistsError(_refusal(root))
    _refuse_foreign_files(root)
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = staging_dir(parent, f".{os.path.basename(os.path.abspath(root))}-")
    try:
        _write_split(tmp, train_split, train_images, image_size, max_objects, seed)
        _write_split(tmp, val_split, val_images, image_size, max_objects, seed)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(params, f, indent=1)
        _move_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace or not os.path.isdir(root):  # another process may have finished the same data set first
            raise


def _refuse_foreign_files(root: str) -> None:
    """Raises FileExistsError when ``root``, a generated set, holds files the generator did not write (regenerating
    it would delete them)."""
    others = not_generated(root, read_marker(root) or {}) if os.path.exists(root) else []
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise FileExistsError(
            f"{root} holds a generated shapes data set and files the generator did not write ({shown}); "
            "regenerating it would delete them: move them out of it (a run's output_dir belongs elsewhere), or "
            "choose another data.root"
        )


def not_generated(root: str, recorded: dict[str, Any]) -> list[str]:
    """The entries of the generated data set ``root`` (paths relative to it) that the generator, with the parameters
    ``recorded`` in its marker, did not write: anything but the marker, ``annotations/instances_<split>.json`` and
    the splits' ``NNNNNN.jpg`` images."""
    counts = {
        recorded.get("train_split"): recorded.get("train_images"),
        recorded.get("val_split"): recorded.get("val_images"),
    }
    found = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name == MARKER and os.path.isfile(path):
            continue
        if name == "annotations" and os.path.isdir(path):
            written = {f"instances_{split}.json" for split in counts}
        elif name in counts and isinstance(counts[name], int) and os.path.isdir(path):
            written = {f"{number:06d}.jpg" for number in range(1, counts[name] + 1)}
        else:
            found.append(name)
            continue
        found.extend(os.path.join(name, entry) for entry in sorted(os.listdir(path)) if entry not in written)
    return found


def _refusal(root: str) -> str:
    """Why ``make_shapes`` does not write into the existing ``root``, and what to do instead."""
    if read_marker(root) is None:
        owner, fix = f"was not generated here (it has no {MARKER} file)", "choose another folder"
    else:
        owner, fix = "holds a generated shapes data set", "regenerate it with tools/make_shapes.py --force"
    return (
        f"{root} already exists and {owner}; the shapes data set is only written into a new folder or over one it "
        f"generated itself: {fix}"
    )


def _move_into_place(tmp: str, root: str) -> None:
    """Renames ``tmp`` to ``root``; a generated ``root`` (marker checked by the caller) is moved aside first and
    removed once the new one is in place."""
    if not os.path.exists(root):
        os.rename(tmp, root)
        return
    old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(root)), prefix=".replaced-")
    aside = os.path.join(old, "data")
    os.rename(root, aside)
    os.rename(tmp, root)
    shutil.rmtree(old, ignore_errors=True)


def _split_names(cfg: DataConfig) -> tuple[str, str]:
    """The COCO split names the synthetic set is written under (``auto`` -> train2017 / val2017)."""
    train = "train2017" if cfg.train_split == "auto" else cfg.train_split
    val = "val2017" if cfg.val_split == "auto" else cfg.val_split
    return train, val


def ensure_synthetic(cfg: DataConfig, seed: int = 0) -> bool:
    """Generates the synthetic data set into ``cfg.root`` when ``cfg.synthetic`` asks for it and the folder is
    missing, or regenerates it when the folder is one it generated (:data:`MARKER`) with other parameters. A folder
    without the marker is never touched (a warning says so) and read as it is. Returns True when it generated.
    Call it from one process only."""
    if cfg.synthetic == "":
        return False
    if cfg.synthetic != "shapes":
        raise ConfigError(f"config key 'data.synthetic' must be '' or 'shapes', got {cfg.synthetic!r}")
    if not os.path.exists(cfg.root):
        make_shapes_from_config(cfg, seed=seed)
        return True
    recorded = read_marker(cfg.root)
    if recorded is None:
        warnings.warn(
            f"data.synthetic=shapes: {cfg.root} exists and was not generated by it (no {MARKER} file), so it is "
            "left untouched and read as the data set it is",
            stacklevel=2,
        )
        return False
    train_split, val_split = _split_names(cfg)
    wanted = {
        "train_images": cfg.synthetic_train_images,
        "val_images": cfg.synthetic_val_images,
        "image_size": cfg.synthetic_image_size,
        "max_objects": cfg.synthetic_max_objects,
        "train_split": train_split,
        "val_split": val_split,
    }  # not the seed: tools/make_shapes.py --seed N makes a set that training then uses as it is
    changed = {key: (recorded.get(key), value) for key, value in wanted.items() if recorded.get(key) != value}
    if not changed:
        return False
    try:
        _refuse_foreign_files(cfg.root)  # before saying it regenerates
    except FileExistsError as exc:
        raise DatasetError(f"data.synthetic=shapes: {exc}") from exc
    warnings.warn(
        f"data.synthetic=shapes: regenerating {cfg.root}, which it generated with other parameters "
        f"({', '.join(f'{key} {old} -> {new}' for key, (old, new) in changed.items())})",
        stacklevel=2,
    )
    try:
        make_shapes_from_config(cfg, seed=seed, replace=True)
    except FileExistsError as exc:  # it holds files of the user's: not replaced
        raise DatasetError(f"data.synthetic=shapes: {exc}") from exc
    return True


def make_shapes_from_config(cfg: DataConfig, seed: int = 0, replace: bool = False) -> None:
    """``make_shapes`` into ``cfg.root`` with the sizes and split names of ``cfg`` (``data.synthetic_*``)."""
    train_split, val_split = _split_names(cfg)
    make_shapes(
        cfg.root,
        train_images=cfg.synthetic_train_images,
        val_images=cfg.synthetic_val_images,
        image_size=cfg.synthetic_image_size,
        max_objects=cfg.synthetic_max_objects,
        seed=seed,
        train_split=train_split,
        val_split=val_split,
        replace=replace,
    )
