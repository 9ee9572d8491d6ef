"""Numeric parity with the original implementation (fundamentalvision/Deformable-DETR).

Needs a checkout of the original: ``DEFORMABLE_DETR_ORIGINAL=/path/to/Deformable-DETR pytest tests/...``; skipped
otherwise. The original's ``models/*.py`` and ``util/*.py`` are imported from the checkout unchanged, except that its
``MSDeformAttn`` (a CUDA-only extension) is replaced by ``deformable.MSDeformAttn``, which has the same parameters
and semantics and is tested against the original's PyTorch reference elsewhere. The same weights are loaded into both
models (strict, so the state_dict layouts must agree) and the outputs, losses, gradients and detections compared.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types

import pytest
import torch

import deformable
from models import build_criterion, build_detector, build_postprocessor, load_config

ORIGINAL = os.environ.get("DEFORMABLE_DETR_ORIGINAL", "")
pytestmark = [
    pytest.mark.skipif(
        not os.path.isfile(os.path.join(ORIGINAL, "models", "deformable_detr.py")),
        reason="set DEFORMABLE_DETR_ORIGINAL to a checkout of fundamentalvision/Deformable-DETR",
    ),
    pytest.mark.usefixtures("one_thread"),
]

VARIANTS = {
    "single_scale": ["model.num_feature_levels=1"],
    "multi_scale": [],
    "box_refine": ["model.with_box_refine=true"],
    "two_stage": ["model.with_box_refine=true", "model.two_stage=true"],
}
SMALL = [
    "model.pretrained_backbone=false",
    "model.enc_layers=2",
    "model.dec_layers=3",
    "model.num_queries=30",
    "model.dropout=0.0",
]


@pytest.fixture(scope="module")
def original():
    """The original's ``deformable_detr`` module, imported as ``ddetr_original.deformable_detr``."""
    stubs = {
        "util": _package("util", os.path.join(ORIGINAL, "util")),
        "ddetr_original": _package("ddetr_original", os.path.join(ORIGINAL, "models")),
        "models.ops": types.ModuleType("models.ops"),
        "models.ops.modules": types.ModuleType("models.ops.modules"),
    }
    stubs["models.ops.modules"].MSDeformAttn = deformable.MSDeformAttn
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        detr = importlib.import_module("ddetr_original.deformable_detr")
        backbone = importlib.import_module("ddetr_original.backbone")
        backbone.is_main_process = lambda: False  # its "pretrained=is_main_process()" would download weights
        yield detr
    finally:
        for name in [n for n in sys.modules if n.startswith(("ddetr_original", "util"))]:
            del sys.modules[name]
        for name, module in saved.items():
            if module is not None:
                sys.modules[name] = module
            else:
                sys.modules.pop(name, None)


def _package(name: str, path: str) -> types.ModuleType:
    package = types.ModuleType(name)
    package.__path__ = [path]
    return package


def _args(cfg) -> argparse.Namespace:
    m, loss = cfg.model, cfg.loss
    return argparse.Namespace(
        dataset_file="coco",
        device="cpu",
        masks=False,
        frozen_weights=None,
        lr_backbone=2e-5,
        backbone=m.backbone,
        dilation=m.dilation,
        position_embedding=m.position_embedding,
        num_feature_levels=m.num_feature_levels,
        enc_layers=m.enc_layers,
        dec_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward,
        hidden_dim=m.hidden_dim,
        dropout=m.dropout,
        nheads=m.nheads,
        num_queries=m.num_queries,
        enc_n_points=m.enc_n_points,
        dec_n_points=m.dec_n_points,
        with_box_refine=m.with_box_refine,
        two_stage=m.two_stage,
        aux_loss=m.aux_loss,
        set_cost_class=loss.set_cost_class,
        set_cost_bbox=loss.set_cost_bbox,
        set_cost_giou=loss.set_cost_giou,
        cls_loss_coef=loss.cls_loss_coef,
        bbox_loss_coef=loss.bbox_loss_coef,
        giou_loss_coef=loss.giou_loss_coef,
        focal_alpha=loss.focal_alpha,
    )


def _randomise(model: torch.nn.Module) -> None:
    """Moves every parameter and BatchNorm buffer off its initial value, so that no head is trivially zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith(("running_mean", "bias")):
                b.normal_(0.0, 0.1)
            elif name.endswith("weight"):
                b.uniform_(0.5, 1.5)


def _inputs():
    images = torch.randn(2, 3, 128, 160)
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, 96:, :] = True
    mask[1, :, 112:] = True
    images[1][:, mask[1]] = 0.0
    targets = [
        {
            "labels": torch.tensor([1, 17, 90]),
            "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2], [0.7, 0.8, 0.3, 0.2]]),
        },
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.4, 0.6, 0.3, 0.5]])},
    ]
    return images, mask, targets


def _compare_outputs(ours: dict, theirs: dict, atol: float = 1e-4) -> None:
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=1e-4)
    assert len(ours.get("aux_outputs", [])) == len(theirs.get("aux_outputs", []))
    for a, b in zip(ours.get("aux_outputs", []), theirs.get("aux_outputs", []), strict=True):
        _compare_outputs(a, b, atol)
    assert ("enc_outputs" in ours) == ("enc_outputs" in theirs)
    if "enc_outputs" in ours:
        _compare_outputs(ours["enc_outputs"], theirs["enc_outputs"], atol)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_original(original, variant):
    torch.manual_seed(0)
    cfg = load_config(None, SMALL + VARIANTS[variant])
    ours = build_detector(cfg)
    theirs, their_criterion, their_post = original.build(_args(cfg))
    _randomise(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images, mask, targets = _inputs()
    nested = original.NestedTensor(images, mask)

    ours.eval(), theirs.eval()
    with torch.no_grad():
        out, ref = ours(images, mask), theirs(nested)
    _compare_outputs(out, ref)
    sizes = torch.tensor([[480, 640], [300, 350]])
    for a, b in zip(build_postprocessor(cfg)(out, sizes), their_post["bbox"](ref, sizes), strict=True):
        torch.testing.assert_close(a["scores"], b["scores"])
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=1e-4)

    # Training: losses and gradients in float64, where both must agree to round-off (in float32 the gradients of
    # box refinement amplify the round-off of a different operation order to ~1e-3 relative).
    ours.double().train(), theirs.double().train()
    images = images.double()
    targets = [{"labels": t["labels"], "boxes": t["boxes"].double()} for t in targets]
    losses = build_criterion(cfg)(ours(images, mask), targets)
    ref_losses = their_criterion(theirs(original.NestedTensor(images, mask)), targets)
    weights = their_criterion.weight_dict
    ref_total = sum(ref_losses[k] * weights[k] for k in ref_losses if k in weights)
    assert set(losses) - {"loss"} == {k for k in ref_losses if k in weights}
    for key in set(losses) - {"loss"}:
        torch.testing.assert_close(losses[key], ref_losses[key] * weights[key], atol=1e-10, rtol=1e-10)
    losses["loss"].backward()
    ref_total.backward()
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        q = their_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
