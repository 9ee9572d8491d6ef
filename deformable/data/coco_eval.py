"""COCO bbox evaluation with pycocotools: detections in the results format and the 12 standard metrics.

Here, below training and inference, because both write COCO results (``tools/eval.py`` scores them, ``tools/infer.py``
writes ``results.json``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(
    image_id: int, result: Mapping[str, torch.Tensor], category_ids: Iterable[int] | None = None
) -> list[dict]:
    """One image's post-processed detections -> COCO results entries.

    ``result`` holds ``scores`` (k,), ``labels`` (k,) and ``boxes`` (k, 4) absolute xyxy in original image pixels.
    Labels are category ids (the original's convention); labels that are no category in ``category_ids`` (e.g. the
    unused class 0) are dropped. Entries: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``.
    """
    known = None if category_ids is None else set(category_ids)
    boxes = result["boxes"].detach().float().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    entries = []
    for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), boxes.tolist(), strict=True):
        if known is not None and label not in known:
            continue
        entries.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
    return entries


def coco_metrics(coco_gt: COCO, detections: list[dict], image_ids: Iterable[int], verbose: bool = False) -> dict:
    """Runs COCOeval (bbox) on ``image_ids`` and returns the 12 metrics by name (:data:`STAT_NAMES`).

    ``verbose`` prints pycocotools' standard summary. Metrics without ground truth are -1 as in pycocotools; with
    no detections at all every metric is 0.
    """
    image_ids = sorted(set(image_ids))
    if not detections:
        if verbose:
            print("no detections: every metric is 0")
        return dict.fromkeys(STAT_NAMES, 0.0)
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    return dict(zip(STAT_NAMES, stats.tolist(), strict=True))
