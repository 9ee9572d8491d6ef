"""Training-only extra queries (models/training_queries.py): the attention mask, on paper and in the detector, the
detector unchanged without them, the noise, and the denoising, group and IoU-aware (varifocal) losses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _models_utils import padded_batch, perturb, sample_targets, tiny_config

from models import build_criterion, build_detector
from models.criterion import SetCriterion, varifocal_loss
from models.matcher import HungarianMatcher
from models.training_noise import noise_boxes, noise_labels
from models.training_queries import (
    ExtraLayout,
    ExtraQueries,
    QueryAids,
    TrainingDetector,
    build_query_aids,
    extra_attention_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_ON = ["training_queries.dn_groups=2", "training_queries.query_groups=3"]
VARIANTS = {
    "multi_scale": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
    "cope": ["model.dec_offset_mode=cope", "model.with_box_refine=true"],
}
WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _blocks(layout: ExtraLayout, q: int) -> list[range]:
    blocks = [range(0, q)]
    blocks += [range(q + i * layout.dn_slots, q + (i + 1) * layout.dn_slots) for i in range(layout.dn_groups)]
    blocks += [range(q + layout.group_slice(g).start, q + layout.group_slice(g).stop) for g in range(2)]
    return blocks


def test_mask_keeps_matching_dn_groups_and_query_groups_apart():
    q, layout = 4, ExtraLayout(dn_groups=2, dn_slots=3, query_groups=2, group_size=4)
    mask = extra_attention_mask(q, layout)
    assert mask.shape == (q + 6 + 8, q + 6 + 8) and mask.dtype == torch.bool
    assert not mask[:q, :q].any() and mask[:q, q:].all()  # matching queries never see an extra query
    blocks = _blocks(layout, q)
    for row_block in blocks:
        for col_block in blocks:
            sub = mask[row_block.start : row_block.stop, col_block.start : col_block.stop]
            assert (not sub.any()) if row_block == col_block else sub.all()


def test_padded_slots_are_hidden_from_every_other_query():
    q, layout = 3, ExtraLayout(dn_groups=2, dn_slots=2, query_groups=0, group_size=3)
    padding = torch.tensor([[False, False, False, False], [False, True, False, True]])  # image 1 has one target
    extra = ExtraQueries(
        torch.zeros(2, 4, 8),
        torch.zeros(2, 4, 8),
        torch.zeros(2, 4, 2),
        extra_attention_mask(q, layout),
        padding,
        layout,
    )
    mask = extra.self_attn_mask(num_heads=2).view(2, 2, 7, 7)
    assert torch.equal(mask[0, 0], mask[0, 1]) and torch.equal(mask[0, 0], extra.attn_mask)
    image1 = mask[1, 0]
    for slot in (q + 1, q + 3):  # the padded slots: nobody attends to them, they attend to themselves
        assert image1[torch.arange(7) != slot, slot].all() and not image1[slot, slot]
    assert (~image1).any(1).all()  # no query is left with nothing to attend to
    no_padding = dataclasses.replace(extra, padding=torch.zeros_like(padding))
    assert no_padding.self_attn_mask(num_heads=2) is no_padding.attn_mask


def _model_and_aids(variant: list[str], *options: str, seed: int = 0):
    cfg = tiny_config(*variant, "model.dropout=0.0", *options)
    torch.manual_seed(seed)
    detector = build_detector(cfg)
    perturb(detector)
    aids = build_query_aids(cfg)
    if aids is not None:
        perturb(aids)
    return cfg, detector.eval(), aids


def _replace_slots(extra: ExtraQueries, slots: slice | list[int], generator: torch.Generator) -> ExtraQueries:
    """The same extra queries with new random content, position and reference at ``slots``."""
    fields = {}
    for name in ("tgt", "query_pos", "reference_points"):
        value = getattr(extra, name).clone()
        value[:, slots] = torch.rand(value[:, slots].shape, generator=generator)
        fields[name] = value
    return dataclasses.replace(extra, **fields)


def _assert_same(a: dict, b: dict, keys: tuple[str, ...] = ("pred_logits", "pred_boxes")) -> None:
    for key in keys:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matching_queries_do_not_see_the_extra_queries(variant):
    two_stage = "model.two_stage=true" in VARIANTS[variant]
    options = ["training_queries.dn_groups=2"] + ([] if two_stage else ["training_queries.query_groups=3"])
    _, detector, aids = _model_and_aids(VARIANTS[variant], *options)
    images, mask = padded_batch()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        plain = detector(images, mask)
        extra = aids.make(sample_targets(), generator=generator)
        with_extra = detector(images, mask, extra=extra)
        other = detector(images, mask, extra=_replace_slots(extra, slice(None), generator))
    for a, b in ((plain, with_extra), (with_extra, other)):
        _assert_same(a, b)
        for aux_a, aux_b in zip(a["aux_outputs"], b["aux_outputs"], strict=True):
            _assert_same(aux_a, aux_b)
    assert "extra_outputs" not in plain and len(with_extra["extra_outputs"]) == 3
    assert with_extra["pred_logits"].shape == plain["pred_logits"].shape == (2, 20, 5)
    assert with_extra["extra_outputs"][-1]["pred_boxes"].shape == (2, extra.layout.num_extra, 4)


def test_extra_groups_do_not_see_each_other_and_padding_changes_nothing():
    _, detector, aids = _model_and_aids([], *ALL_ON)
    images, mask = padded_batch()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        extra = aids.make(sample_targets(), generator=generator)  # 2 and 1 targets: slot 1 of image 1 is padding
        layout = extra.layout
        base = detector(images, mask, extra=extra)["extra_outputs"][-1]
        blocks = [list(range(i * 2, i * 2 + 2)) for i in range(2)]
        blocks += [list(range(layout.group_slice(g).start, layout.group_slice(g).stop)) for g in range(2)]
        for changed in blocks:
            out = detector(images, mask, extra=_replace_slots(extra, changed, generator))["extra_outputs"][-1]
            kept = [i for i in range(layout.num_extra) if i not in changed]
            _assert_same({k: v[:, kept] for k, v in base.items()}, {k: v[:, kept] for k, v in out.items()})
            assert not torch.allclose(base["pred_boxes"][:, changed], out["pred_boxes"][:, changed])
        padded = dataclasses.replace(extra, tgt=extra.tgt.clone())
        padded.tgt[1, [1, 3]] += 10.0  # image 1's padded slot in both denoising groups
        out = detector(images, mask, extra=padded)["extra_outputs"][-1]
        valid = torch.ones(2, layout.num_extra, dtype=torch.bool)
        valid[1, [1, 3]] = False
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(base[key][valid], out[key][valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["multi_scale", "two_stage"])
def test_without_extra_the_detector_is_the_plain_one(variant):
    options = ["training_queries.dn_groups=2", "loss.iou_aware=true"]
    if variant != "two_stage":
        options.append("training_queries.query_groups=2")
    _, plain, _ = _model_and_aids(VARIANTS[variant])
    _, trained, aids = _model_and_aids(VARIANTS[variant], *options)
    assert plain.state_dict().keys() == trained.state_dict().keys()  # no key added to the detector
    for key, value in plain.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), key
    assert not set(dict(aids.named_parameters())) & set(plain.state_dict())
    images, mask = padded_batch()
    with torch.no_grad():
        a, b = plain(images, mask), trained(images, mask, extra=None)
    assert a.keys() == b.keys()
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    for aux_a, aux_b in zip(a["aux_outputs"], b["aux_outputs"], strict=True):
        assert torch.equal(aux_a["pred_boxes"], aux_b["pred_boxes"])


def test_aids_make_what_the_layout_says():
    cfg = tiny_config(*ALL_ON)
    aids = build_query_aids(cfg)
    assert {name.split(".")[0] for name, _ in aids.named_parameters()} == {
        "label_embed",
        "box_pos",
        "group_embed",
        "group_reference_points",
    }
    assert aids.group_embed.weight.shape == (2 * 20, 2 * 64) and aids.label_embed.weight.shape == (5, 64)
    targets = sample_targets()
    extra = aids.make(targets, generator=torch.Generator().manual_seed(0))
    layout = extra.layout
    assert (layout.dn_groups, layout.dn_slots, layout.query_groups, layout.group_size) == (2, 2, 2, 20)
    assert extra.tgt.shape == extra.query_pos.shape == (2, 44, 64) and extra.reference_points.shape == (2, 44, 2)
    assert extra.padding.tolist() == [[False] * 44, [False, True, False, True] + [False] * 40]
    for b, (slots, target_index) in enumerate(layout.dn_indices([2, 1])):
        centre = targets[b]["boxes"][target_index, :2]
        size = targets[b]["boxes"][target_index, 2:]
        assert ((extra.reference_points[b, slots] - centre).abs() <= 0.4 * size / 2 + 1e-6).all()
    two_stage = build_query_aids(tiny_config(*VARIANTS["two_stage"], "training_queries.dn_groups=1"))
    assert two_stage.make(targets).reference_points.shape == (2, 2, 4)
    assert build_query_aids(tiny_config()) is None


def test_no_targets_and_two_stage_groups():
    aids = build_query_aids(tiny_config("training_queries.dn_groups=3"))
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    extra = aids.make(empty)
    assert extra.tgt.shape == (2, 0, 64) and extra.attn_mask.shape == (20, 20) and not extra.attn_mask.any()
    with pytest.raises(ValueError, match="query_groups=3.*two_stage.*query_groups=1"):
        build_query_aids(tiny_config(*VARIANTS["two_stage"], "training_queries.query_groups=3"))
    with pytest.raises(ValueError, match="dn_label_noise"):
        QueryAids(hidden_dim=64, num_classes=5, num_queries=20, dn_groups=1, dn_label_noise=1.5)


def test_aids_for_another_query_count_are_refused():
    cfg = tiny_config("training_queries.query_groups=2")
    detector = build_detector(cfg)
    aids = QueryAids(hidden_dim=64, num_classes=5, num_queries=10, query_groups=2)
    with pytest.raises(ValueError, match="attn_mask must be \\(30, 30\\).*num_queries"):
        detector(*padded_batch(), extra=aids.make(sample_targets()))


def test_noised_boxes_stay_in_the_image_and_in_range():
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(20000, 2, generator=g), torch.rand(20000, 2, generator=g) * 0.9 + 0.05], -1)
    noised = noise_boxes(boxes, 0.4, g)
    corners = torch.cat([noised[:, :2] - noised[:, 2:] / 2, noised[:, :2] + noised[:, 2:] / 2], -1)
    assert corners.min() >= -1e-6 and corners.max() <= 1 + 1e-6
    inside = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).repeat(20000, 1)  # never clipped: the raw ranges show
    noised = noise_boxes(inside, 0.4, g)
    shift = (noised[:, :2] - inside[:, :2]).abs() / (inside[:, 2:] / 2)
    scale = noised[:, 2:] / inside[:, 2:]
    assert shift.max() <= 0.4 + 1e-5 and shift.max() > 0.39
    assert scale.min() >= 0.6 - 1e-5 and scale.max() <= 1.4 + 1e-5 and scale.min() < 0.61 and scale.max() > 1.39
    torch.testing.assert_close(noise_boxes(inside[:5], 0.0), inside[:5])  # up to the xyxy round trip


def test_label_noise_flips_at_the_set_rate():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (40000,), generator=g)
    noised = noise_labels(labels, 7, 0.2, g)
    changed = noised != labels
    assert abs(changed.float().mean().item() - 0.2) < 0.01
    assert noised.min() >= 0 and noised.max() < 7
    other = torch.bincount(noised[changed & (labels == 3)], minlength=7)[[0, 1, 2, 4, 5, 6]].float()
    assert (other / other.mean() - 1).abs().max() < 0.2  # a flip draws the other classes uniformly
    assert torch.equal(noise_labels(labels, 7, 0.0, g), labels) and torch.equal(noise_labels(labels, 1, 0.9), labels)


def test_varifocal_loss_by_hand():
    criterion = SetCriterion(2, HungarianMatcher(), WEIGHTS, focal_alpha=0.25, iou_aware=True)
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.3]]])  # 2 predictions, 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # prediction 0 <-> target 0 (class 1)
    loss = criterion.loss_labels({"pred_logits": logits, "pred_boxes": boxes}, targets, indices, num_boxes=1.0)

    iou = (0.15 * 0.2) / (0.04 + 0.04 - 0.15 * 0.2)  # boxes overlap on x in [0.45, 0.6]

    def p(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    def negative(x: float) -> float:
        return -0.75 * p(x) ** 2 * math.log(1 - p(x))

    positive = -iou * (iou * math.log(p(-1.0)) + (1 - iou) * math.log(1 - p(-1.0)))
    expected = positive + negative(0.5) + negative(2.0) + negative(0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # With no positive it is exactly the focal loss of the negatives.
    torch.testing.assert_close(
        varifocal_loss(logits, torch.zeros_like(logits)),
        torch.tensor([[[negative(0.5), negative(-1.0)], [negative(2.0), negative(0.3)]]]),
    )


def _dn_outputs(targets: list[dict], layout: ExtraLayout, shift: float = 0.0) -> dict:
    """Denoising predictions that are the targets exactly (logit +30 at the label, -30 elsewhere), the first
    target's x shifted by ``shift``; padded slots hold nonsense that must not count."""
    b, k = len(targets), 5
    logits = torch.full((b, layout.num_dn, k), 3.0)
    boxes = torch.full((b, layout.num_dn, 4), 0.9)
    for i, (slots, target_index) in enumerate(layout.dn_indices([len(t["labels"]) for t in targets])):
        logits[i, slots] = -30.0
        logits[i, slots, targets[i]["labels"][target_index]] = 30.0
        boxes[i, slots] = targets[i]["boxes"][target_index]
    boxes[0, target_index_of(layout, 0), 0] += shift
    return {"pred_logits": logits, "pred_boxes": boxes}


def target_index_of(layout: ExtraLayout, target: int) -> list[int]:
    return [g * layout.dn_slots + target for g in range(layout.dn_groups)]


@pytest.mark.parametrize("iou_aware", [False, True])
def test_denoising_loss_is_zero_when_perfect_and_l1_by_hand(iou_aware):
    criterion = SetCriterion(5, HungarianMatcher(), WEIGHTS, iou_aware=iou_aware)
    targets, layout = sample_targets(), ExtraLayout(dn_groups=3, dn_slots=2, query_groups=0, group_size=20)
    outputs = {"pred_logits": torch.zeros(2, 20, 5), "pred_boxes": torch.full((2, 20, 4), 0.5)}
    perfect = {**outputs, "extra_outputs": [_dn_outputs(targets, layout)], "extra_layout": layout}
    losses = criterion(perfect, targets)
    for name in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
        assert losses[name].item() == pytest.approx(0.0, abs=1e-6), name
    shifted = {**perfect, "extra_outputs": [_dn_outputs(targets, layout, shift=0.05)]}
    losses = criterion(shifted, targets)
    # 3 copies of target 0 are off by 0.05 in x; normalised by num_boxes (3) * dn_groups (3); weight 5.
    assert losses["loss_bbox_dn"].item() == pytest.approx(5 * 3 * 0.05 / 9, rel=1e-5)


def test_group_losses_are_the_matching_losses_of_each_group():
    criterion = build_criterion(tiny_config("loss.iou_aware=true"))
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 20, 5, generator=g), torch.rand(2, 20, 4, generator=g) * 0.5 + 0.25
    layout = ExtraLayout(dn_groups=0, dn_slots=0, query_groups=2, group_size=20)
    extra = {"pred_logits": torch.cat([logits.flip(1), logits], 1), "pred_boxes": torch.cat([boxes.flip(1), boxes], 1)}
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "extra_outputs": [extra], "extra_layout": layout}
    losses = criterion(outputs, sample_targets())
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[name + "_g1"], losses[name])  # the same predictions, reordered
        torch.testing.assert_close(losses[name + "_g2"], losses[name])
    assert losses["loss"].item() == pytest.approx(3 * sum(losses[n].item() for n in WEIGHTS), rel=1e-5)


def test_training_detector_trains_every_aid_parameter():
    cfg, detector, aids = _model_and_aids(VARIANTS["box_refine"], *ALL_ON, "loss.iou_aware=true")
    model = TrainingDetector(detector.train(), aids)
    outputs = model(*padded_batch(), sample_targets())
    build_criterion(cfg)(outputs, sample_targets())["loss"].backward()
    for name, param in aids.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
