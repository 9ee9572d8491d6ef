"""Detection over image files: batches with padding, a COCO-format results file and, with a drawing function passed
in (:func:`deformable.viz.detections.draw_detections`, a layer above this one), annotated images."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from deformable.data import dataset_image_ids
from deformable.data.coco_eval import to_coco_results
from models import build_postprocessor
from models.config import Config
from models.files import make_dir

from .images import prepare_batch, read_image
from .predictor import class_names, detect, load_detector

# (image (H, W, 3) RGB, one result: scores (k,), labels (k,), boxes (k, 4) xyxy pixels, id -> name) -> BGR image
DrawDetections = Callable[[np.ndarray, Mapping[str, torch.Tensor], Mapping[int, str]], np.ndarray]


def image_ids(paths: Sequence[str], cfg: Config) -> dict[str, int]:
    """Path -> image id: the id of the same file name in the data set of ``cfg.data`` (any layout, so the results
    can be scored against it), else its position (1-based) in ``paths``."""
    known = dataset_image_ids(cfg.data)
    ids = {p: known.get(os.path.basename(p), i + 1) for i, p in enumerate(paths)}
    return ids if len(set(ids.values())) == len(ids) else {p: i + 1 for i, p in enumerate(paths)}


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """Path -> ``<stem>.jpg``, with ``_<n>`` added where stems repeat."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = f"{stem}.jpg", 1
        while name in used:
            name, n = f"{stem}_{n}.jpg", n + 1
        used.add(name)
        names[path] = name
    return names


def run_inference(
    cfg: Config,
    checkpoint: str | None,
    paths: Sequence[str],
    out_dir: str,
    *,
    score_threshold: float = 0.3,
    batch_size: int = 1,
    device: torch.device,
    show_progress: bool = True,
    draw: DrawDetections | None = None,
) -> list[dict]:
    """Detects on ``paths`` and writes ``out_dir/results.json`` (COCO results of the detections >= ``score_threshold``:
    ``image_id``, ``category_id``, ``bbox`` xywh, ``score``), ``out_dir/images.json`` (COCO ``images`` entries: ``id``,
    ``file_name``, ``height``, ``width``) and, with ``draw``, ``out_dir/<stem>.jpg``: the image ``draw`` returns for
    those detections (``tools/infer.py`` passes :func:`deformable.viz.detections.draw_detections`).

    Returns the results list.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    make_dir(out_dir, "the output folder")
    model, state = load_detector(cfg, checkpoint, device)
    postprocessor = build_postprocessor(cfg)
    names = class_names(cfg, state)
    ids, files = image_ids(paths, cfg), output_names(paths)
    results, images = [], []
    bar = tqdm(total=len(paths), desc="infer", unit="img", disable=not show_progress, dynamic_ncols=True)
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        pictures = [read_image(p) for p in batch]
        sizes = torch.tensor([p.shape[:2] for p in pictures])
        _, detections = detect(model, postprocessor, *prepare_batch(pictures, cfg.data), sizes)
        for path, picture, found in zip(batch, pictures, detections, strict=True):
            kept = _above(found, score_threshold)
            if draw is not None:
                cv2.imwrite(os.path.join(out_dir, files[path]), draw(picture, kept, names))
            results += to_coco_results(ids[path], kept, sorted(names) or None)
            images.append({"id": ids[path], "file_name": path, "height": picture.shape[0], "width": picture.shape[1]})
        bar.update(len(batch))
    bar.close()
    _write_json(os.path.join(out_dir, "results.json"), results)
    _write_json(os.path.join(out_dir, "images.json"), images)
    return results


def _above(result: Mapping[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    keep = result["scores"] >= threshold
    return {k: v[keep] for k, v in result.items()}


def _write_json(path: str, payload: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)
