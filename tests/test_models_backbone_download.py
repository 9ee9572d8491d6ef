"""A backbone's ImageNet weights that cannot be downloaded (no network, a proxy) and a backbone the builder refuses
are ConfigErrors that say how to go on, reported by the tools without a traceback."""

from __future__ import annotations

import urllib.error

import pytest
import timm
import torchvision
from _repo import load_tool
from tiny_training import SHAPES_CONFIG, tiny_overrides

from models import build_detector, load_config
from models.config import ConfigError

train_tool = load_tool("train")


def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_an_offline_torchvision_download_says_how_to_go_on(monkeypatch) -> None:
    real = torchvision.models.resnet18

    def resnet18(*, weights=None, **kwargs):
        return _offline() if weights is not None else real(weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "resnet18", resnet18)
    cfg = load_config(None, ["model.backbone=resnet18", "model.pretrained_backbone=true"])
    with pytest.raises(ConfigError, match=r"ImageNet weights of the backbone resnet18 could not be downloaded") as info:
        build_detector(cfg)
    assert "URLError" in str(info.value) and "model.pretrained_backbone=false" in str(info.value)
    build_detector(load_config(None, ["model.backbone=resnet18", "model.pretrained_backbone=false"]))  # no download


def test_an_offline_timm_download_says_how_to_go_on(monkeypatch) -> None:
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        return _offline() if pretrained else real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    cfg = load_config(None, ["model.backbone=timm/resnet18", "model.pretrained_backbone=true"])
    with pytest.raises(ConfigError, match=r"backbone timm/resnet18 could not be downloaded"):
        build_detector(cfg)
    with pytest.raises(ConfigError, match=r"unknown or unsupported timm backbone 'timm/no_such_net'"):
        build_detector(load_config(None, ["model.backbone=timm/no_such_net", "model.pretrained_backbone=true"]))


def test_a_backbone_the_builder_refuses_is_reported_without_a_traceback(shapes_root, tmp_path, capsys) -> None:
    argv = [SHAPES_CONFIG, *tiny_overrides(shapes_root, str(tmp_path / "run")), "model.dilation=true"]  # resnet18
    assert train_tool.main(argv) == 1
    assert "error: model.dilation (DC5) needs bottleneck blocks" in capsys.readouterr().err
