"""Each detector variant builds, runs forward and backward, and trains exactly the parameters it should."""

from __future__ import annotations

import re

import pytest
import torch
from _models_utils import VARIANTS, padded_batch, perturb, sample_targets, tiny_config

from models import build_criterion, build_detector, build_postprocessor

pytestmark = pytest.mark.usefixtures("one_thread")

FROZEN = re.compile(r"^backbone\.0\.body\.(conv1|layer1)\.")  # the stem and layer1 (FrozenBatchNorm has no params)
BOX_HIDDEN = re.compile(r"bbox_embed\.\d+\.layers\.[01]\.")


def _train_step(cfg, perturbation: float = 0.0):
    torch.manual_seed(0)
    model = build_detector(cfg)
    if perturbation:
        perturb(model, perturbation)
    images, mask = padded_batch()
    out = model(images, mask)
    losses = build_criterion(cfg)(out, sample_targets())
    losses["loss"].backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    return model, out, losses, no_grad


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_backward_reaches_every_trainable_parameter(variant):
    cfg = tiny_config(*VARIANTS[variant])
    model, out, losses, no_grad = _train_step(cfg, perturbation=0.02)
    b, q, k, n_dec = 2, cfg.model.num_queries, cfg.model.num_classes, cfg.model.dec_layers

    assert out["pred_logits"].shape == (b, q, k)
    assert out["pred_boxes"].shape == (b, q, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == n_dec - 1
    assert ("enc_outputs" in out) == cfg.model.two_stage
    if cfg.model.two_stage:
        assert out["enc_outputs"]["pred_logits"].shape[-1] == k

    suffixes = [""] + [f"_{i}" for i in range(n_dec - 1)] + (["_enc"] if cfg.model.two_stage else [])
    expected = {f"{name}{s}" for name in ("loss_ce", "loss_bbox", "loss_giou") for s in suffixes} | {"loss"}
    assert set(losses) == expected
    torch.testing.assert_close(losses["loss"], sum(v for key, v in losses.items() if key != "loss"))

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if FROZEN.match(n)} and frozen
    assert no_grad == set()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_initialisation_exactly_the_zero_initialised_paths_get_no_gradient(variant):
    # level_embed only enters the queries of MSDeformAttn, whose offset/weight projections start at zero weight, and
    # the box MLPs' hidden layers sit behind a zero last layer: all their gradients are exactly zero at init.
    model, _, _, no_grad = _train_step(tiny_config(*VARIANTS[variant]))
    expected = {n for n, p in model.named_parameters() if BOX_HIDDEN.search(n)} | {"transformer.level_embed"}
    assert no_grad == expected


def test_without_aux_loss_only_the_last_heads_learn():
    cfg = tiny_config("model.with_box_refine=true", "model.aux_loss=false")
    _, out, losses, no_grad = _train_step(cfg, perturbation=0.02)
    assert "aux_outputs" not in out and set(losses) == {"loss_ce", "loss_bbox", "loss_giou", "loss"}
    last = cfg.model.dec_layers - 1
    heads = re.compile(r"^(transformer\.decoder\.)?(class|bbox)_embed\.(\d+)\.")
    assert no_grad == {n for n in no_grad if heads.match(n) and int(heads.match(n).group(3)) < last} and no_grad


def test_heads_are_shared_without_box_refinement_and_separate_with_it():
    shared = build_detector(tiny_config())
    assert all(h is shared.class_embed[0] for h in shared.class_embed)
    assert shared.transformer.decoder.bbox_embed is None
    refined = build_detector(tiny_config("model.with_box_refine=true"))
    assert len({id(h) for h in refined.bbox_embed}) == len(refined.bbox_embed)
    assert refined.transformer.decoder.bbox_embed is refined.bbox_embed
    torch.testing.assert_close(refined.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    torch.testing.assert_close(refined.bbox_embed[1].layers[-1].bias, torch.zeros(4))
    two_stage = build_detector(tiny_config(*VARIANTS["two_stage"]))
    assert len(two_stage.class_embed) == two_stage.transformer.decoder.class_embed.__len__() == 4
    assert all(not h.layers[-1].bias.any() for h in two_stage.bbox_embed)
    prior = -torch.log(torch.tensor(99.0))
    torch.testing.assert_close(shared.class_embed[0].bias, prior.expand(5))


def test_forward_is_deterministic_and_survives_a_state_dict_round_trip():
    cfg = tiny_config("model.with_box_refine=true", "model.two_stage=true", "model.num_queries=10")
    torch.manual_seed(1)
    first = build_detector(cfg).eval()
    perturb(first)
    torch.manual_seed(2)
    second = build_detector(cfg).eval()
    images, mask = padded_batch()
    with torch.no_grad():
        a, b = first(images, mask), first(images, mask)
        assert not torch.equal(second(images, mask)["pred_boxes"], a["pred_boxes"])
        second.load_state_dict(first.state_dict(), strict=True)
        c = second(images, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
        assert torch.equal(a[key], c[key])
    assert torch.equal(a["enc_outputs"]["pred_boxes"], c["enc_outputs"]["pred_boxes"])


@pytest.mark.parametrize(
    ("overrides", "strides", "levels"),
    [
        (["model.dilation=true", "model.backbone=resnet50"], [8, 16, 16], 4),
        (["model.num_feature_levels=2"], [16, 32], 2),
        (["model.num_feature_levels=5", "model.position_embedding=learned"], [8, 16, 32], 5),
        (["model.num_feature_levels=1", "model.dilation=true", "model.backbone=resnet101"], [16], 1),
    ],
)
def test_backbone_options(overrides, strides, levels):
    model = build_detector(tiny_config(*overrides)).eval()
    assert model.backbone.strides == strides
    assert len(model.input_proj) == levels == model.transformer.level_embed.shape[0]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out["pred_boxes"].shape == (1, 20, 4) and out["pred_boxes"].isfinite().all()


def test_timm_backbone():
    pytest.importorskip("timm")
    model = build_detector(tiny_config("model.backbone=timm/resnet10t")).eval()
    assert model.backbone.strides == [8, 16, 32]
    assert model.backbone.num_channels == [128, 256, 512]
    trainable = {n.split(".")[2] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))
    assert out["pred_logits"].shape == (1, 20, 5)


def test_timm_backbone_with_nested_stages():
    """timm's features wrapper keeps MobileNet/EfficientNet stages inside ``blocks`` (``blocks.1``): what comes
    before the first stage returned is frozen, the rest trained, as for the ResNets."""
    pytest.importorskip("timm")
    model = build_detector(tiny_config("model.backbone=timm/mobilenetv3_small_050")).eval()
    body = model.backbone[0].body
    assert body.feature_info.module_name()[0] == "blocks.1"
    names = [n for n, _ in body.named_parameters()]
    first = next(i for i, n in enumerate(names) if n.startswith("blocks.1."))
    assert names[0].startswith("conv_stem") and any(n.startswith("blocks.0.") for n in names[:first])
    assert [p.requires_grad for _, p in body.named_parameters()] == [i >= first for i in range(len(names))]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))
    assert out["pred_logits"].shape == (1, 20, 5) and out["pred_boxes"].isfinite().all()


def test_postprocessor_runs_on_detector_outputs():
    cfg = tiny_config()
    model = build_detector(cfg).eval()
    with torch.no_grad():
        results = build_postprocessor(cfg)(model(torch.randn(2, 3, 64, 64)), torch.tensor([[480, 640], [64, 64]]))
    assert [r["scores"].shape[0] for r in results] == [cfg.loss.num_select] * 2
    for r in results:
        assert (r["boxes"][:, 2:] >= r["boxes"][:, :2]).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
