"""Generates "ordinal": a synthetic detection set whose class is a mark's position in its row, counted from the left.

    python tools/experiments/make_ordinal.py data/ordinal                     # 300 train, 100 val, seed 0
    python tools/experiments/make_ordinal.py data/ordinal --train 600 --seed 3 --size 192
    python tools/experiments/make_ordinal.py data/ordinal_wide --gaps 4 12 --val-gaps 16 28   # wider gaps in val

A task where content-dependent positions matter: the class cannot be read off one mark, nor off its absolute
position, only by counting the marks to its left along the same line.

Each image is ``--size`` pixels square (default 160) on a plain light background (one random light colour per
image) with mild pixel noise (sigma 4). It holds 1 or 2 horizontal rows at random vertical positions; the rows'
bands (the marks' extent plus their jitter) never overlap and are at least 6 pixels apart. A row holds 3 to 5
identical marks: one shape (a filled circle, square or triangle), one dark random colour and one size (10-18 px)
per row. The marks are placed left to right from a random start x, with a random gap of 4-40 px between
neighbours (``--gaps``; drawn anew per gap, so that absolute x says little about the ordinal), and each mark moves
up or down by a random 0-2 px. Rows always fit inside the image (gaps are redrawn until the row does; a row whose
gaps never fit gets the smallest gap everywhere). There are no distractors: every mark is labelled.

``--val-gaps`` draws the validation split's gaps from another range: the counting probe's out-of-distribution test
(``tools/experiments/cope_counting.py``) for a detector. A model that learned where the n-th mark lies in pixels
misplaces the ordinal at unseen gaps; one that counts marks does not. The training split does not depend on
``--val-gaps``, so two folders made with the same seed and ``--gaps`` train on the same images and their
validation splits give the in- and out-of-distribution scores of one model.

Classes (category ids 1-4): "1st", "2nd", "3rd" for the first three marks of a row, "later" for the fourth and
fifth. Each box is the tight box of the mark's drawn pixels (COCO ``[x, y, w, h]`` in pixels). With 1-2 rows of
3-5 marks the four classes are about equally frequent.

Writes the COCO layout the readers detect (``train2017/``, ``val2017/``, ``annotations/instances_*.json``);
``data.root=PATH`` with ``configs/custom.yaml`` reads it. Train with ``data.hflip=false data.crop=false``: a
horizontal flip turns "1st" into the last mark, and a crop that cuts off a row's first marks changes the ordinals
of the rest, so both augmentations would contradict the labels. Deterministic for a given seed (each split has its
own random stream, so the val set does not depend on ``--train``). Refuses a folder that exists and is not empty.
"""

from __future__ import annotations

import argparse
import os
import sys
from itertools import pairwise

import cv2
import numpy as np

from deformable.data.coco import write_coco_split

CLASSES = ["1st", "2nd", "3rd", "later"]
SHAPES = ["circle", "square", "triangle"]
MARKS_PER_ROW = (3, 5)  # inclusive
MARK_SIZE = (10, 18)  # inclusive, pixels
GAP = (4, 40)  # inclusive, pixels between neighbouring marks (the default of --gaps)
JITTER = 2  # pixels up or down per mark
ROW_SPACING = 6  # pixels at least between two rows' bands
MARGIN = 2  # pixels kept free at the image border
NOISE = 4.0
GAP_TRIES = 1000


def min_size(smallest_gap: int) -> int:
    """The smallest image side in which the widest row fits with every gap at ``smallest_gap``."""
    return MARKS_PER_ROW[1] * MARK_SIZE[1] + (MARKS_PER_ROW[1] - 1) * smallest_gap + 2 * MARGIN


def _mark_mask(shape: str, x: int, y: int, size: int, height: int, width: int) -> np.ndarray:
    """A boolean (height, width) mask of one filled mark in the ``size`` square whose top-left corner is (x, y)."""
    mask = np.zeros((height, width), np.uint8)
    last = size - 1
    if shape == "square":
        cv2.rectangle(mask, (x, y), (x + last, y + last), 255, -1)
    elif shape == "circle":  # pixel centres within size / 2 of the square's centre: exactly size pixels across
        yy, xx = np.ogrid[0:height, 0:width]
        mask[(xx - x - last / 2) ** 2 + (yy - y - last / 2) ** 2 <= (size / 2) ** 2] = 255
    else:
        points = np.array([[x, y + last], [x + last, y + last], [x + last // 2, y]], np.int32)
        cv2.fillPoly(mask, [points], 255)
    return mask > 0


def _gaps(rng: np.random.Generator, count: int, size: int, room: int, gap: tuple[int, int]) -> list[int]:
    """``count - 1`` gaps, each uniform in ``gap`` (inclusive), redrawn until the row of ``count`` marks fits in
    ``room`` pixels."""
    for _ in range(GAP_TRIES):
        gaps = [int(g) for g in rng.integers(gap[0], gap[1] + 1, count - 1)]
        if count * size + sum(gaps) <= room:
            return gaps
    return [gap[0]] * (count - 1)  # the narrowest row always fits (min_size)


def _row_tops(rng: np.random.Generator, sizes: list[int], height: int) -> list[int]:
    """The top y of each row's marks before jitter; the bands ``[top - JITTER, top + size + JITTER)`` stay inside
    the image border and at least ROW_SPACING apart."""
    while True:
        tops = [int(rng.integers(MARGIN + JITTER, height - MARGIN - JITTER - s + 1)) for s in sizes]
        bands = sorted((t - JITTER, t + s + JITTER) for t, s in zip(tops, sizes, strict=True))
        if all(b[0] - a[1] >= ROW_SPACING for a, b in pairwise(bands)):
            return tops


def make_image(
    rng: np.random.Generator, size: int, gap: tuple[int, int] = GAP
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One BGR image and its marks as (category id 1..4, xyxy box), row by row, left to right; gaps in ``gap``."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = rng.integers(200, 251, 3)
    rows = int(rng.integers(1, 3))
    mark_sizes = [int(rng.integers(MARK_SIZE[0], MARK_SIZE[1] + 1)) for _ in range(rows)]
    objects: list[tuple[int, list[float]]] = []
    for top, mark in zip(_row_tops(rng, mark_sizes, size), mark_sizes, strict=True):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = rng.integers(0, 161, 3)
        count = int(rng.integers(MARKS_PER_ROW[0], MARKS_PER_ROW[1] + 1))
        gaps = _gaps(rng, count, mark, size - 2 * MARGIN, gap)
        width = count * mark + sum(gaps)
        x = int(rng.integers(MARGIN, size - MARGIN - width + 1))
        for position in range(count):
            y = top + int(rng.integers(-JITTER, JITTER + 1))
            mask = _mark_mask(shape, x, y, mark, size, size)
            image[mask] = colour
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            objects.append((min(position, len(CLASSES) - 1) + 1, box))
            if position < count - 1:
                x += mark + gaps[position]
    image += rng.normal(0, NOISE, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def write_split(root: str, split: str, count: int, size: int, seed: int, gap: tuple[int, int] = GAP) -> list[int]:
    """Writes ``count`` images of one split and its COCO annotation file; returns the number of objects per class."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    samples = (make_image(rng, size, gap) for _ in range(count))
    description = f"synthetic ordinal rows, seed {seed}, {size} px, gaps {gap[0]}-{gap[1]} px"
    return write_coco_split(root, f"{split}2017", samples, CLASSES, "ordinal", description)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="output folder (must not exist, or be empty)")
    parser.add_argument("--train", type=int, default=300, help="training images (default 300)")
    parser.add_argument("--val", type=int, default=100, help="validation images (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size", type=int, default=160, help=f"image side in pixels (default 160, at least {min_size(GAP[0])})"
    )
    parser.add_argument(
        "--gaps", type=int, nargs=2, default=list(GAP), metavar=("MIN", "MAX"),
        help=f"pixels between neighbouring marks, inclusive (default {GAP[0]} {GAP[1]})",
    )  # fmt: skip
    parser.add_argument(
        "--val-gaps", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
        help="the validation split's gaps (default: --gaps): unseen gaps for an out-of-distribution test",
    )  # fmt: skip
    args = parser.parse_args(argv)
    gaps = {"train": tuple(args.gaps), "val": tuple(args.val_gaps or args.gaps)}
    for flag, (low, high) in (("--gaps", gaps["train"]), ("--val-gaps", gaps["val"])):
        if not 1 <= low <= high:
            print(f"error: {flag} must be 1 <= MIN <= MAX, got {low} {high}", file=sys.stderr)
            return 1
    # Every written split's widest row must fit at its smallest gap.
    smallest = max((gaps[split][0] for split, n in (("train", args.train), ("val", args.val)) if n > 0), default=0)
    if args.size < min_size(smallest):
        print(
            f"error: --size must be at least {min_size(smallest)} (the widest row at gaps of {smallest} px), got "
            f"{args.size}",
            file=sys.stderr,
        )
        return 1
    if args.train < 0 or args.val < 0:
        print("error: --train and --val must not be negative", file=sys.stderr)
        return 1
    if os.path.exists(args.root) and os.listdir(args.root):
        print(f"error: {args.root} exists and is not empty; give a new folder", file=sys.stderr)
        return 1
    for split, n in (("train", args.train), ("val", args.val)):
        per_class = write_split(args.root, split, n, args.size, args.seed, gaps[split])
        counts = ", ".join(f"{name} {c}" for name, c in zip(CLASSES, per_class, strict=True))
        print(f"{split}: {n} images, gaps {gaps[split][0]}-{gaps[split][1]} px, {sum(per_class)} objects ({counts})")
    print(f"wrote {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
