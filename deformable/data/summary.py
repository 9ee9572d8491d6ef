"""One line per split before training: what was read, and the numbers that decide whether the model fits it."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .dataset import DetectionDataset


def max_objects(dataset: DetectionDataset) -> int:
    """The most boxes that training sees in one image (crowd / difficult boxes excluded)."""
    counts = Counter(a["image_id"] for a in dataset.coco.dataset["annotations"] if not a.get("iscrowd", 0))
    return max(counts.values(), default=0)


def _box_sizes(dataset: DetectionDataset) -> np.ndarray:
    """Per box, sqrt((w / W) * (h / H)): the box side relative to the image side (geometric means)."""
    images = dataset.coco.imgs
    sizes = [
        math.sqrt(a["bbox"][2] * a["bbox"][3] / (images[a["image_id"]]["width"] * images[a["image_id"]]["height"]))
        for a in dataset.coco.dataset["annotations"]
    ]
    return np.asarray(sizes, dtype=np.float64)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith(("s", "x")) else f"{n} {noun}s"


def _range(values: list[int]) -> str:
    return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])


def summarise(dataset: DetectionDataset, num_queries: int | None = None) -> str:
    """``split (layout, source): N images, M boxes, K classes, ...`` on one line, then a warning line when an
    image has more objects than ``num_queries`` (``model.num_queries``) can detect."""
    coco = dataset.coco.dataset
    anns = coco["annotations"]
    crowd = sum(1 for a in anns if a.get("iscrowd", 0))
    widths = [info["width"] for info in coco["images"]]
    heights = [info["height"] for info in coco["images"]]
    most = max_objects(dataset)
    parts = [
        _count(len(coco["images"]), "image"),
        _count(len(anns), "box") + (f" ({crowd} crowd/difficult, ignored)" if crowd else ""),
        _count(len(coco["categories"]), "class"),
        f"at most {_count(most, 'object')} per image",
        f"image width {_range(widths)} px, height {_range(heights)} px",
    ]
    sizes = _box_sizes(dataset)
    if len(sizes):
        q10, q50, q90 = np.quantile(sizes, [0.1, 0.5, 0.9])
        parts.append(f"box side / image side: median {q50:.2f}, 10%-90% {q10:.2f}-{q90:.2f}")
    if dataset.data.clipped:
        clipped = dataset.data.clipped
        parts.append(f"{_count(clipped, 'box')} clipped to {'its image' if clipped == 1 else 'their images'}")
    if dataset.data.dropped:
        example = f" (e.g. {dataset.data.dropped_example})" if dataset.data.dropped_example else ""
        parts.append(f"{_count(dataset.data.dropped, 'box')} with no area in the image dropped{example}")
    parts.extend(dataset.data.notes)
    line = f"{dataset.split} ({dataset.layout}, {dataset.source}): " + ", ".join(parts)
    if num_queries is not None and most > num_queries:
        suggested = int(math.ceil(most * 1.5 / 10) * 10)
        line += (
            f"\nwarning: an image of the {dataset.split} split has {most} objects but model.num_queries is "
            f"{num_queries}, so the detector cannot find them all; raise it, e.g. model.num_queries={suggested}"
        )
    return line
