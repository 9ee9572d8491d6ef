"""Matcher, set criterion and post-processor."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _models_utils import tiny_config
from torchvision.ops import box_convert, generalized_box_iou

import models.criterion as criterion_module
from models import build_criterion, build_postprocessor
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
    return torch.cat([centre, size], -1)


def _problem(seed: int, num_queries: int, sizes: list[int], num_classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(len(sizes), num_queries, num_classes, generator=g),
        "pred_boxes": torch.stack([_random_boxes(num_queries, g) for _ in sizes]),
    }
    targets = [
        {"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": _random_boxes(n, g)} for n in sizes
    ]
    return outputs, targets


def test_cost_matrix_is_the_focal_l1_giou_cost():
    outputs, targets = _problem(0, 5, [3])
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    cost = matcher.cost_matrix(outputs, targets)[0]
    p = outputs["pred_logits"][0].sigmoid()[:, targets[0]["labels"]]
    focal = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
    l1 = (outputs["pred_boxes"][0][:, None] - targets[0]["boxes"][None]).abs().sum(-1)
    xyxy = [box_convert(b, "cxcywh", "xyxy") for b in (outputs["pred_boxes"][0], targets[0]["boxes"])]
    torch.testing.assert_close(cost, 2 * focal + 5 * l1 - 2 * generalized_box_iou(*xyxy))


@pytest.mark.parametrize("seed", range(6))
def test_matcher_is_optimal_against_brute_force(seed):
    sizes = [[0, 3], [4, 1], [2, 5]][seed % 3]
    outputs, targets = _problem(seed, 5, sizes)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    cost = matcher.cost_matrix(outputs, targets)
    indices = matcher(outputs, targets)
    start = 0
    for b, (n, (pred, tgt)) in enumerate(zip(sizes, indices, strict=True)):
        block = cost[b, :, start : start + n]
        start += n
        assert len(pred) == len(tgt) == n and len(set(pred.tolist())) == n and sorted(tgt.tolist()) == list(range(n))
        best = min(
            (sum(block[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), n)),
            default=0.0,
        )
        torch.testing.assert_close(block[pred, tgt].sum(), torch.as_tensor(best, dtype=block.dtype))


def _perfect_outputs(targets: list[dict], num_queries: int = 6, num_classes: int = 5) -> dict:
    logits = torch.full((len(targets), num_queries, num_classes), -30.0)
    boxes = torch.full((len(targets), num_queries, 4), 0.5)
    boxes[..., 2:] = 0.1
    for b, t in enumerate(targets):
        n = len(t["labels"])
        logits[b, torch.arange(n), t["labels"]] = 30.0
        boxes[b, :n] = t["boxes"]
    out = {"pred_logits": logits, "pred_boxes": boxes}
    return {**out, "aux_outputs": [dict(out), dict(out)], "enc_outputs": dict(out)}


def _targets() -> list[dict]:
    return [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]])},
        {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.3]])},
    ]


def test_criterion_is_near_zero_for_perfect_predictions():
    targets = _targets()
    outputs = _perfect_outputs(targets)
    # the encoder proposals are class-agnostic: their perfect class is 0
    outputs["enc_outputs"]["pred_logits"] = torch.where(
        torch.arange(5) == 0, outputs["pred_logits"].max(-1, keepdim=True).values, torch.tensor(-30.0)
    )
    losses = build_criterion(tiny_config())(outputs, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "bbox", "giou") for s in ("", "_0", "_1", "_enc")} | {"loss"}
    for key, value in losses.items():
        assert value.abs() < 1e-6, key


def test_criterion_normalisation_and_weights():
    torch.manual_seed(0)
    targets = _targets()
    outputs = {"pred_logits": torch.randn(2, 6, 5), "pred_boxes": torch.rand(2, 6, 4) * 0.5 + 0.25}
    losses = build_criterion(tiny_config("loss.cls_loss_coef=1", "loss.bbox_loss_coef=1", "loss.giou_loss_coef=1"))(
        outputs, targets
    )
    weighted = build_criterion(tiny_config())(outputs, targets)  # the original's 2 / 5 / 2
    for name, weight in (("loss_ce", 2), ("loss_bbox", 5), ("loss_giou", 2)):
        torch.testing.assert_close(weighted[name], weight * losses[name])
    torch.testing.assert_close(weighted["loss"], weighted["loss_ce"] + weighted["loss_bbox"] + weighted["loss_giou"])

    # focal loss summed over every query and class, divided by the number of target boxes (3)
    indices = build_criterion(tiny_config()).matcher(outputs, targets)
    onehot = torch.zeros(2, 6, 5)
    for b, (pred, tgt) in enumerate(indices):
        onehot[b, pred, targets[b]["labels"][tgt]] = 1
    p = outputs["pred_logits"].sigmoid()
    p_t = p * onehot + (1 - p) * (1 - onehot)
    bce = -(onehot * p.log() + (1 - onehot) * (1 - p).log())
    focal = (0.25 * onehot + 0.75 * (1 - onehot)) * (1 - p_t) ** 2 * bce
    torch.testing.assert_close(losses["loss_ce"], focal.sum() / 3)


def test_criterion_with_images_without_targets():
    outputs = {"pred_logits": torch.randn(2, 6, 5, requires_grad=True), "pred_boxes": torch.rand(2, 6, 4)}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = build_criterion(tiny_config())(outputs, targets)
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss"].isfinite()
    losses["loss"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_num_boxes_is_averaged_over_processes(monkeypatch):
    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.mul_(4))  # 4 ranks with 3 boxes each
    assert criterion_module.average_num_boxes(_targets(), torch.device("cpu")) == 3.0
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.zero_())
    assert criterion_module.average_num_boxes(_targets(), torch.device("cpu")) == 1.0  # clamped


def test_postprocessor_converts_to_absolute_xyxy():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 1, 2] = 3.0
    logits[1, 0, 3] = 1.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2, 3, 1)
    boxes[0, 1] = torch.tensor([0.25, 0.5, 0.5, 0.2])
    results = build_postprocessor(tiny_config("loss.num_select=5"))(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200], [50, 80]])
    )
    assert [r["scores"].shape for r in results] == [torch.Size([5])] * 2
    top = results[0]
    assert top["labels"][0] == 2
    torch.testing.assert_close(top["scores"][0], torch.tensor(1 / (1 + math.exp(-3.0))))
    torch.testing.assert_close(top["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))  # w=200, h=100
    torch.testing.assert_close(results[1]["boxes"][0], torch.tensor([32.0, 15.0, 48.0, 35.0]))
    assert results[1]["labels"][0] == 3


def test_postprocessor_keeps_at_most_all_pairs():
    out = PostProcess(num_select=100)(
        {"pred_logits": torch.randn(1, 3, 4), "pred_boxes": torch.rand(1, 3, 4)}, torch.tensor([[10, 10]])
    )
    assert out[0]["scores"].shape == (12,)
