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
AP_NAMES = STAT_NAMES[:6]  # the precision half: what the epoch log line and the training curves show


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
    return coco_scores(coco_gt, detections, image_ids, verbose=verbose)[0]


ANY_CLASS = "(any class)"


def class_metrics(coco_gt: COCO, detections: list[dict], image_ids: Iterable[int]) -> dict[str, dict[str, float]]:
    """AP and AP50 per category (keyed by its name, in category id order), then :data:`ANY_CLASS`: AP and AP50 with
    the categories ignored (every detection matched against every box), which tells a detector that finds the
    objects but names them wrongly (class-agnostic AP high, per-class AP low) from one that misses them.

    A category without ground truth in ``image_ids`` gets -1, as in pycocotools; with no detections every value is 0.
    """
    return coco_scores(coco_gt, detections, image_ids, per_class=True)[1]


def coco_scores(
    coco_gt: COCO,
    detections: list[dict],
    image_ids: Iterable[int],
    *,
    verbose: bool = False,
    per_class: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """:func:`coco_metrics` and, with ``per_class``, :func:`class_metrics` (else an empty dict): the per-category
    values are read from the COCOeval run that gives the 12 metrics; only the class-agnostic row needs a second run
    (``useCats=0``)."""
    names = {cat_id: cat["name"] for cat_id, cat in coco_gt.cats.items()}
    image_ids = sorted(set(image_ids))  # read twice below
    if not detections:
        if verbose:
            print("no detections: every metric is 0")
        classes = [*(names[c] for c in sorted(names)), ANY_CLASS]
        table = {name: {"AP": 0.0, "AP50": 0.0} for name in classes} if per_class else {}
        return dict.fromkeys(STAT_NAMES, 0.0), table
    evaluator = _cocoeval(coco_gt, detections, image_ids, use_categories=True, verbose=verbose)
    metrics = dict(zip(STAT_NAMES, np.asarray(evaluator.stats, dtype=np.float64).tolist(), strict=True))
    if not per_class:
        return metrics, {}
    # precision: (IoU thresholds, recall points, categories, area ranges, max detections); area "all", 100 detections
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    table = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        table[names[cat_id]] = {"AP": _mean_defined(precision[:, :, k]), "AP50": _mean_defined(precision[0, :, k])}
    # useCats=0 still gathers detections by the ground truth's category ids, so one of another category (a class the
    # model was trained on that this data set lacks) would be left out: every detection gets one known id.
    any_id = evaluator.params.catIds[0] if evaluator.params.catIds else 0
    relabelled = [{**d, "category_id": any_id} for d in detections]
    agnostic = _cocoeval(coco_gt, relabelled, image_ids, use_categories=False).stats
    table[ANY_CLASS] = {"AP": float(agnostic[0]), "AP50": float(agnostic[1])}
    return metrics, table


def _mean_defined(precision: np.ndarray) -> float:
    """The mean of the entries pycocotools filled in (-1 marks no ground truth), or -1 when there are none."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else -1.0


def _cocoeval(
    coco_gt: COCO, detections: list[dict], image_ids: Iterable[int], use_categories: bool, verbose: bool = False
) -> COCOeval:
    """COCOeval (bbox) on ``image_ids``, evaluated, accumulated and summarised (its stats filled in); pycocotools'
    printing only with ``verbose``. ``detections`` is not modified (loadRes adds keys to what it is given)."""
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.params.useCats = int(use_categories)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator
