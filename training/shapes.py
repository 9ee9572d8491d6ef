"""A small synthetic detection data set of coloured shapes, written in the COCO layout.

``root/train2017/*.jpg``, ``root/val2017/*.jpg``, ``root/annotations/instances_{train2017,val2017}.json``: the
same files the COCO pipeline reads, so the demo exercises exactly the code that trains on COCO. Three classes:
circles, axis-aligned squares and triangles (pointing up or down), each in its own two hues with random shading, on
a random dark or light background with noise. Colour and shape both tell the class, which keeps the task learnable
by a small model trained from scratch on two CPU cores in minutes. Shapes overlap little, and each box is the tight
box of the drawn pixels. Generation is deterministic for a given seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import cv2
import numpy as np

from models.config import ConfigError, DataConfig

CATEGORIES = ["circle", "square", "triangle"]  # category ids 1..3, so model.num_classes = 4
HUES = {
    "circle": [(220, 40, 40), (235, 130, 30)],
    "square": [(40, 170, 60), (40, 190, 200)],
    "triangle": [(50, 80, 225), (190, 60, 200)],
}  # RGB
MAX_OVERLAP = 0.2  # intersection over the smaller box


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


def _image(rng: np.random.Generator, image_size: int, max_objects: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (H, W, 3) RGB and its annotations (without ids); H and W are drawn in [0.75, 1] x image_size."""
    height, width = (int(rng.integers(int(0.75 * image_size), image_size + 1)) for _ in range(2))
    canvas = _background(rng, height, width)
    placed: list[np.ndarray] = []
    annotations = []
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
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        annotations.append(
            {"category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "iscrowd": 0}
        )
    return canvas, annotations


def _write_split(root: str, split: str, count: int, image_size: int, max_objects: int, seed: int) -> None:
    rng = np.random.default_rng([seed, 0 if split.startswith("train") else 1])
    os.makedirs(os.path.join(root, split))
    images, annotations = [], []
    for image_id in range(1, count + 1):
        canvas, anns = _image(rng, image_size, max_objects)
        file_name = f"{image_id:06d}.jpg"
        bgr = cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)
        cv2.imwrite(os.path.join(root, split, file_name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": image_id, "file_name": file_name, "height": canvas.shape[0], "width": canvas.shape[1]})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    payload = {
        "info": {"description": f"synthetic shapes, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f)


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
) -> None:
    """Writes the data set into ``root`` (which must not exist), atomically: a sibling temporary folder is filled
    and then renamed, so an interrupted generation leaves nothing behind."""
    if os.path.exists(root):
        raise FileExistsError(f"{root} already exists; delete it to generate the shapes data set again")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(root))}-")
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        _write_split(tmp, train_split, train_images, image_size, max_objects, seed)
        _write_split(tmp, val_split, val_images, image_size, max_objects, seed)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(root):  # another process may have finished the same data set first
            raise


def ensure_synthetic(cfg: DataConfig) -> bool:
    """Generates the synthetic data set into ``cfg.root`` when ``cfg.synthetic`` asks for it and the folder is
    missing. Returns True when it generated. Call it from one process only."""
    if cfg.synthetic == "":
        return False
    if cfg.synthetic != "shapes":
        raise ConfigError(f"config key 'data.synthetic' must be '' or 'shapes', got {cfg.synthetic!r}")
    if os.path.exists(cfg.root):
        return False
    make_shapes_from_config(cfg)
    return True


def make_shapes_from_config(cfg: DataConfig, seed: int = 0) -> None:
    """``make_shapes`` into ``cfg.root`` with the sizes and split names of ``cfg`` (``data.synthetic_*``)."""
    make_shapes(
        cfg.root,
        train_images=cfg.synthetic_train_images,
        val_images=cfg.synthetic_val_images,
        image_size=cfg.synthetic_image_size,
        max_objects=cfg.synthetic_max_objects,
        seed=seed,
        train_split=cfg.train_split,
        val_split=cfg.val_split,
    )
