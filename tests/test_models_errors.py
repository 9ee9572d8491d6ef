"""Bad input gives clear errors naming the problem."""

from __future__ import annotations

import pytest
import torch
from _models_utils import tiny_config

from models import build_criterion, build_detector, build_postprocessor
from models.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return build_detector(tiny_config()).eval()


@pytest.mark.parametrize(
    ("images", "mask", "error", "message"),
    [
        (torch.randn(3, 64, 64), None, ValueError, r"images must have shape \(B, 3, H, W\), got \(3, 64, 64\)"),
        (torch.randn(1, 4, 64, 64), None, ValueError, r"got \(1, 4, 64, 64\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), None, TypeError, "floating-point tensor .* torch.uint8"),
        ([[0.0]], None, TypeError, "must be a torch.Tensor .* got list"),
        (
            torch.randn(2, 3, 64, 64),
            torch.zeros(2, 64, 32, dtype=torch.bool),
            ValueError,
            r"mask must have shape \(B, H, W\) = \(2, 64, 64\) .* got \(2, 64, 32\)",
        ),
        (torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64), TypeError, "mask must be a bool tensor"),
    ],
)
def test_bad_images_and_masks(model, images, mask, error, message):
    with pytest.raises(error, match=message):
        model(images, mask)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.backbone=resnet42"], "unknown backbone 'resnet42'"),
        (["model.backbone=timm/"], "unknown backbone 'timm/'"),
        (["model.num_feature_levels=0"], "'model.num_feature_levels' must be >= 1, got 0"),
        (["model.num_feature_levels=7"], "got 7"),
        (["model.position_embedding=rope"], "position_embedding must be 'sine' or 'learned', got 'rope'"),
        (["model.hidden_dim=48"], "hidden_dim must be a multiple of 32"),
        (["model.dilation=true"], "DC5.* resnet50/resnet101, not resnet18"),
        (["model.num_queries=0"], "'model.num_queries' must be >= 1, got 0"),
    ],
)
def test_bad_model_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_detector(tiny_config(*overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model.two_stage=true", "model.with_box_refine=true"),
        ("model.enc_offset_mode=cope", "model.dec_offset_mode=cope"),
    ],
    ids=["plain", "two-stage", "cope"],
)
def test_an_empty_batch_gives_empty_outputs(overrides):
    model = build_detector(tiny_config(*overrides)).eval()
    with torch.no_grad():
        out = model(torch.randn(0, 3, 96, 112), torch.zeros(0, 96, 112, dtype=torch.bool))
    assert out["pred_logits"].shape[0] == 0 and out["pred_boxes"].shape[0] == 0
    assert out["pred_boxes"].shape[1:] == (model.num_queries, 4)


def test_unknown_timm_model():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="unknown or unsupported timm backbone 'timm/not_a_model'"):
        build_detector(tiny_config("model.backbone=timm/not_a_model"))


def test_unknown_config_key_is_a_config_error():
    with pytest.raises(ConfigError, match="model.backbones"):
        tiny_config("model.backbones=resnet50")


def test_two_stage_on_an_image_too_small_for_its_queries():
    model = build_detector(tiny_config("model.two_stage=true", "model.num_queries=300")).eval()
    with pytest.raises(ValueError, match="num_queries=300 proposals but the encoder has only 85 positions"):
        model(torch.randn(1, 3, 64, 64))


def test_bad_targets_and_sizes():
    cfg = tiny_config()
    outputs = {"pred_logits": torch.randn(1, 4, 5), "pred_boxes": torch.rand(1, 4, 4)}
    criterion = build_criterion(cfg)
    with pytest.raises(ValueError, match="targets must be a list of 1 dicts"):
        criterion(outputs, [])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\] must be in \[0, 5\)"):
        criterion(outputs, [{"labels": torch.tensor([5]), "boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] must be \(1, 4\)"):
        criterion(outputs, [{"labels": torch.tensor([1]), "boxes": torch.rand(2, 4)}])
    with pytest.raises(ValueError, match=r"labels'\] must be \(n,\) int64"):
        criterion(outputs, [{"labels": torch.tensor([1.0]), "boxes": torch.rand(1, 4)}])
    with pytest.raises(ValueError, match=r"target_sizes must be \(B, 2\) = \(1, 2\)"):
        build_postprocessor(cfg)(outputs, torch.tensor([480, 640]))
