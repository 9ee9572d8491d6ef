"""COCO results conversion and the 12 metrics against hand-made ground truth."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from pycocotools.coco import COCO

from deformable.data import coco_eval
from deformable.data.coco_eval import ANY_CLASS, STAT_NAMES, class_metrics, coco_metrics, coco_scores, to_coco_results

pytestmark = pytest.mark.usefixtures("one_thread")


def _ground_truth() -> COCO:
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 60, "height": 60}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [60, 20, 30, 50], "area": 1500, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0, 0, 60, 60], "area": 3600, "iscrowd": 0},
        ],
        "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _result(boxes_xyxy: list[list[float]], labels: list[int], scores: list[float]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes_xyxy), "labels": torch.tensor(labels), "scores": torch.tensor(scores)}


def test_results_are_xywh_with_category_ids_and_unknown_labels_dropped() -> None:
    result = _result([[10, 10, 50, 40], [1, 2, 3, 4]], [5, 0], [0.9, 0.8])
    assert to_coco_results(1, result, [5, 9]) == [
        {"image_id": 1, "category_id": 5, "bbox": [10.0, 10.0, 40.0, 30.0], "score": pytest.approx(0.9)}
    ]


def test_perfect_detections_score_one() -> None:
    gt = _ground_truth()
    detections = to_coco_results(1, _result([[10, 10, 50, 40], [60, 20, 90, 70]], [5, 9], [0.9, 0.8]), [5, 9])
    detections += to_coco_results(2, _result([[0, 0, 60, 60]], [5], [0.7]), [5, 9])
    metrics = coco_metrics(gt, detections, [1, 2])
    assert tuple(metrics) == STAT_NAMES
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AR100"] == pytest.approx(1.0) and metrics["APs"] == -1.0  # no small objects in the ground truth


def test_wrong_class_and_missing_image_lower_the_metrics() -> None:
    gt = _ground_truth()
    detections = to_coco_results(1, _result([[10, 10, 50, 40], [60, 20, 90, 70]], [9, 9], [0.9, 0.8]), [5, 9])
    metrics = coco_metrics(gt, detections, [1, 2])
    assert 0.0 < metrics["AP"] < 1.0 and metrics["AR100"] == pytest.approx(0.5)


def test_no_detections_gives_zeros(capsys) -> None:
    assert coco_metrics(_ground_truth(), [], [1, 2], verbose=True) == dict.fromkeys(STAT_NAMES, 0.0)
    assert "no detections" in capsys.readouterr().out


def test_class_metrics_tell_wrong_names_from_missed_objects() -> None:
    gt = _ground_truth()
    boxes = [[10, 10, 50, 40], [60, 20, 90, 70]]
    right = to_coco_results(1, _result(boxes, [5, 9], [0.9, 0.8]), [5, 9])
    right += to_coco_results(2, _result([[0, 0, 60, 60]], [5], [0.7]), [5, 9])
    assert class_metrics(gt, right, [1, 2]) == {
        "five": {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)},
        "nine": {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)},
        ANY_CLASS: {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)},
    }
    swapped = to_coco_results(1, _result(boxes, [9, 5], [0.9, 0.8]), [5, 9])  # every box found, named wrongly
    swapped += to_coco_results(2, _result([[0, 0, 60, 60]], [9], [0.7]), [5, 9])
    metrics = class_metrics(gt, swapped, iter([1, 2]))  # any iterable of ids, read more than once inside
    assert metrics["five"]["AP"] == 0.0 and metrics["nine"]["AP"] == 0.0
    assert metrics[ANY_CLASS] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}
    missed = to_coco_results(1, _result([boxes[0]], [5], [0.9]), [5, 9])  # one of two "five"s, no "nine"
    metrics = class_metrics(gt, missed, [1, 2])
    assert metrics["five"]["AP50"] == pytest.approx(0.5, abs=0.01) and metrics["nine"]["AP"] == 0.0
    assert 0.0 < metrics[ANY_CLASS]["AP"] < 0.5


def test_class_metrics_without_ground_truth_or_detections() -> None:
    gt = _ground_truth()
    only_image_2 = class_metrics(gt, to_coco_results(2, _result([[0, 0, 60, 60]], [5], [0.7]), [5, 9]), [2])
    assert only_image_2["nine"] == {"AP": -1.0, "AP50": -1.0}  # no "nine" on image 2
    assert only_image_2["five"]["AP"] == pytest.approx(1.0)
    assert class_metrics(gt, [], [1, 2]) == {name: {"AP": 0.0, "AP50": 0.0} for name in ("five", "nine", ANY_CLASS)}


def test_coco_scores_reads_metrics_and_classes_from_one_categorised_run(monkeypatch) -> None:
    gt = _ground_truth()
    detections = to_coco_results(1, _result([[10, 10, 50, 40], [60, 20, 90, 70]], [9, 9], [0.9, 0.8]), [5, 9])
    runs = []
    real = coco_eval._cocoeval

    def counted(*args, **kwargs):
        runs.append(kwargs["use_categories"])
        return real(*args, **kwargs)

    monkeypatch.setattr(coco_eval, "_cocoeval", counted)
    metrics, per_class = coco_scores(gt, detections, [1, 2], per_class=True)
    assert runs == [True, False]  # the categorised run once, then the class-agnostic one
    assert metrics == coco_metrics(gt, detections, [1, 2])
    assert per_class == class_metrics(gt, detections, [1, 2])
    runs.clear()
    assert coco_scores(gt, detections, [1, 2]) == (metrics, {}) and runs == [True]
    assert coco_scores(gt, [], [1, 2], per_class=True)[1] == class_metrics(gt, [], [1, 2])
