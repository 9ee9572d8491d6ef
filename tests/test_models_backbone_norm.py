"""``model.backbone_norm``: the original's frozen BatchNorm, or GroupNorm trained from random weights; what a
checkpoint shows of it, and the errors that name it."""

from __future__ import annotations

import pytest
import torch
from _models_utils import tiny_config
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from models import build_detector
from models.backbone import resnet_backbone
from models.checkpoint import Checkpoint, CheckpointError, options_from_weights
from models.config import ConfigError
from models.hf_format import write_hf
from models.loading import load_detector


def _norms(model: nn.Module) -> set[type]:
    return {
        type(m) for m in model.backbone.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, FrozenBatchNorm2d))
    }


def _trainable_stages(model: nn.Module) -> set[str]:
    return {name.split(".")[2] for name, p in model.backbone.named_parameters() if p.requires_grad}


def test_frozen_bn_is_the_original_and_the_default() -> None:
    model = build_detector(tiny_config())
    assert _norms(model) == {FrozenBatchNorm2d}
    assert _trainable_stages(model) == {"layer2", "layer3", "layer4"}  # stem and layer1 frozen, as the original


def test_gn_trains_every_layer_with_group_norm() -> None:
    model = build_detector(tiny_config("model.backbone_norm=gn"))
    assert _norms(model) == {nn.GroupNorm}
    assert all(m.num_groups == 32 for m in model.backbone.modules() if isinstance(m, nn.GroupNorm))
    assert _trainable_stages(model) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert not any("running_mean" in key for key in model.state_dict())
    # Each residual branch ends at zero (Goyal et al.): a fresh block is its shortcut.
    assert all(not block.bn2.weight.detach().any() for block in model.backbone[0].body.layer2)
    images = torch.randn(2, 3, 96, 96)
    out = model(images)
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    assert model.backbone[0].body.conv1.weight.grad is not None  # the stem learns


def test_gn_with_frozen_backbone_freezes_all() -> None:
    model = build_detector(tiny_config("model.backbone_norm=gn", "model.train_backbone=false"))
    assert _trainable_stages(model) == set()


def test_the_weights_show_the_norm_and_a_mismatch_names_the_override() -> None:
    gn = build_detector(tiny_config("model.backbone_norm=gn"))
    frozen = build_detector(tiny_config())
    assert options_from_weights(gn.state_dict())["backbone_norm"] == "gn"
    assert options_from_weights(frozen.state_dict())["backbone_norm"] == "frozen_bn"
    state = gn.state_dict()
    ckpt = Checkpoint("gn.pth", "state_dict", state, options_from_weights(state))
    with pytest.raises(CheckpointError, match=r"backbone_norm: .*'frozen_bn'.*'gn'.*model\.backbone_norm=gn"):
        load_detector(tiny_config(), ckpt)
    loaded, _ = load_detector(tiny_config("model.backbone_norm=gn"), ckpt)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: tiny_config("model.backbone_norm=batch"), ConfigError, "model.backbone_norm.*frozen_bn, gn.*batch"),
        (
            lambda: build_detector(tiny_config("model.backbone_norm=gn", "model.backbone=timm/resnet10t")),
            ValueError,
            "torchvision ResNets only.*frozen_bn",
        ),
        (lambda: resnet_backbone("resnet18", 3, pretrained=True, norm="gn"), ValueError, "ImageNet weights"),
        (lambda: write_hf("unwritten", {}, tiny_config("model.backbone_norm=gn").model), ValueError, "transformers"),
    ],
)
def test_errors_name_the_option(make, error, message) -> None:
    with pytest.raises(error, match=message):
        make()
