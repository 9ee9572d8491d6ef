"""Generates "clutter": a synthetic detection set unlike the shapes demo, for the convergence ablation (issue 19).

    python tools/experiments/make_clutter.py data/clutter                    # 400 train, 100 val, seed 0
    python tools/experiments/make_clutter.py data/clutter --train 800 --seed 3
    python tools/experiments/make_clutter.py data/clutter5 --classes 5 --sizes 24 96   # the ablation's learnable set

What differs from the demo (``deformable.data.shapes``): 8 classes of glyphs (the characters A E K R S X Z 3, in
OpenCV's Hershey fonts, two font faces per class, random slant by shear), a colour that tells nothing about the
class, object sizes from about 10 to 90 pixels in ~224-pixel images (a 9x range instead of ~2x), 1 to 6 objects,
and clutter: a random two-colour gradient background, 15-40 random lines, rectangles and circles in random colours,
0-3 unlabelled distractor glyphs (o + # % in the same fonts), and pixel noise. Each box is the tight box of the
glyph's drawn pixels; labelled glyphs overlap each other by at most 20 % (intersection over the smaller box).

``--classes N`` keeps the first N glyph classes and ``--sizes MIN MAX`` the range of glyph heights (pixels,
log-uniform): the full set (8 classes, 10-90 px) sits at the floor of a 6-epoch CPU budget from scratch
(BENCHMARKS.md); ``--classes 5 --sizes 24 96`` is the issue's own description (5 classes of letters on cluttered
backgrounds) with objects no smaller than the demo's.

Writes the COCO layout the readers detect (``train2017/``, ``val2017/``, ``annotations/instances_*.json``);
``data.root=PATH`` with ``configs/custom.yaml`` reads it. Deterministic for a given seed. Refuses a folder that
exists and is not empty.
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

from deformable.data.coco import write_coco_split

CLASSES = ["A", "E", "K", "R", "S", "X", "Z", "3"]
DISTRACTORS = ["o", "+", "#", "%"]
FONTS = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX]
MAX_OVERLAP = 0.2


def _glyph(rng: np.random.Generator, text: str, height: float) -> np.ndarray:
    """A binary mask (h, w) of ``text`` drawn about ``height`` pixels tall, in a random font, stroke and slant."""
    font = FONTS[int(rng.integers(len(FONTS)))]
    (tw, th), base = cv2.getTextSize(text, font, 1.0, 1)
    scale = height / max(th, 1)
    thickness = max(1, int(round(scale * rng.uniform(1.0, 2.5))))
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    pad = thickness + 2
    mask = np.zeros((th + base + 2 * pad, tw + 2 * pad), np.uint8)
    cv2.putText(mask, text, (pad, pad + th), font, scale, 255, thickness, cv2.LINE_AA)
    shear = rng.uniform(-0.3, 0.3)
    h, w = mask.shape
    affine = np.float32([[1, shear, max(0.0, -shear * h)], [0, 1, 0]])
    mask = cv2.warpAffine(mask, affine, (w + int(abs(shear) * h) + 1, h))
    return mask > 96


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A two-colour linear gradient in a random direction, then lines, rectangles and circles."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
    image = (1 - t)[..., None] * _colour(rng) + t[..., None] * _colour(rng)
    image = image.astype(np.uint8)
    for _ in range(int(rng.integers(15, 41))):
        colour = tuple(int(c) for c in _colour(rng))
        kind = rng.integers(3)
        p = (int(rng.integers(w)), int(rng.integers(h)))
        if kind == 0:
            q = (int(rng.integers(w)), int(rng.integers(h)))
            cv2.line(image, p, q, colour, int(rng.integers(1, 4)), cv2.LINE_AA)
        elif kind == 1:
            q = (p[0] + int(rng.integers(-40, 41)), p[1] + int(rng.integers(-40, 41)))
            cv2.rectangle(image, p, q, colour, int(rng.choice([-1, 1, 2])))
        else:
            cv2.circle(image, p, int(rng.integers(3, 30)), colour, int(rng.choice([-1, 1, 2])), cv2.LINE_AA)
    return image


def _paste(image: np.ndarray, mask: np.ndarray, x: int, y: int, colour: np.ndarray) -> None:
    h, w = mask.shape
    region = image[y : y + h, x : x + w]
    region[mask] = colour.astype(np.uint8)


def _overlap(a: list[float], b: list[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def make_image(
    rng: np.random.Generator, classes: int = len(CLASSES), sizes: tuple[float, float] = (10.0, 90.0)
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One BGR image and its objects as (category id 1..``classes``, xyxy box); glyph heights in ``sizes``."""
    h, w = int(rng.integers(192, 257)), int(rng.integers(192, 257))
    image = _background(rng, h, w)
    objects: list[tuple[int, list[float]]] = []
    wanted = int(rng.integers(1, 7))
    for _ in range(wanted * 10):
        if len(objects) == wanted:
            break
        label = int(rng.integers(classes))
        mask = _glyph(rng, CLASSES[label], float(np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1])))))
        gh, gw = mask.shape
        if gh >= h or gw >= w:
            continue
        x, y = int(rng.integers(0, w - gw)), int(rng.integers(0, h - gh))
        ys, xs = np.nonzero(mask)
        box = [float(x + xs.min()), float(y + ys.min()), float(x + xs.max() + 1), float(y + ys.max() + 1)]
        if any(_overlap(box, other) > MAX_OVERLAP for _, other in objects):
            continue
        _paste(image, mask, x, y, _colour(rng))
        objects.append((label + 1, box))
    for _ in range(int(rng.integers(0, 4))):  # unlabelled distractors, drawn under nothing in particular
        mask = _glyph(rng, DISTRACTORS[int(rng.integers(len(DISTRACTORS)))], float(rng.uniform(10, 60)))
        gh, gw = mask.shape
        if gh < h and gw < w:
            x, y = int(rng.integers(0, w - gw)), int(rng.integers(0, h - gh))
            box = [x, y, x + gw, y + gh]
            if all(_overlap(box, other) == 0 for _, other in objects):
                _paste(image, mask, x, y, _colour(rng))
    noise = rng.normal(0, 8, image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, objects


def write_split(
    root: str, split: str, count: int, rng: np.random.Generator, classes: int, sizes: tuple[float, float]
) -> int:
    """Writes ``count`` images of one split and its COCO annotation file; returns the number of objects."""
    samples = (make_image(rng, classes, sizes) for _ in range(count))
    return sum(write_coco_split(root, f"{split}2017", samples, CLASSES[:classes], "glyph", "synthetic clutter"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="output folder (must not exist, or be empty)")
    parser.add_argument("--train", type=int, default=400, help="training images (default 400)")
    parser.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--classes", type=int, default=len(CLASSES), help=f"glyph classes, 1..{len(CLASSES)} (default all)"
    )
    parser.add_argument(
        "--sizes",
        type=float,
        nargs=2,
        default=(10.0, 90.0),
        metavar=("MIN", "MAX"),
        help="glyph height range in pixels (default 10 90)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.classes <= len(CLASSES):
        parser.error(f"--classes must be between 1 and {len(CLASSES)}, got {args.classes}")
    if not 4 <= args.sizes[0] <= args.sizes[1] <= 160:
        parser.error(f"--sizes needs 4 <= MIN <= MAX <= 160 pixels (images are 192-256 px), got {args.sizes}")
    if os.path.exists(args.root) and os.listdir(args.root):
        print(f"error: {args.root} exists and is not empty; give a new folder", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    splits = (("train", args.train), ("val", args.val))
    counts = {split: write_split(args.root, split, n, rng, args.classes, tuple(args.sizes)) for split, n in splits}
    print(f"wrote {args.root}: {args.train} train images ({counts['train']} objects), {args.val} val ({counts['val']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
