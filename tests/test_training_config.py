"""The tools' command lines: YAML config, key=value overrides, and their errors."""

from __future__ import annotations

import os
import warnings

import pytest
from _repo import config_path, load_tool
from tiny_training import SHAPES_CONFIG

from deformable.training.build import check_options
from models.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

train_tool = load_tool("train")
eval_tool = load_tool("eval")
shapes_tool = load_tool("make_shapes")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochz=3", "unknown config key 'train.epochz'"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=three", "config key 'train.epochs' expects an integer"),
        ("train.lr=fast", "config key 'train.lr' expects a number"),
        ("model.two_stage=maybe", "config key 'model.two_stage' expects true or false"),
        ("data.train_scales=480", "config key 'data.train_scales' expects a list"),
        ("train.epochs", "must look like section.key=value"),
    ],
)
def test_bad_overrides_are_named(override: str, message: str, capsys) -> None:
    for tool, extra in ((train_tool, []), (eval_tool, ["--checkpoint", "x.pth"])):
        assert tool.main([SHAPES_CONFIG, *extra, override]) == 1  # eval: said before the checkpoint is looked for
        assert message in capsys.readouterr().err


def test_missing_config_file(capsys) -> None:
    assert train_tool.main(["configs/nope.yaml"]) == 1
    assert "config file not found: configs/nope.yaml" in capsys.readouterr().err


def test_overrides_apply_in_order_over_the_yaml() -> None:
    overrides = [
        "data.root=/d",
        "model.num_classes=6",
        "train.epochs=2",
        "train.batch_size=4",
        "output_dir=runs/x",
        "train.lr=1e-4",
        "train.epochs=3",
        "data.train_scales=[96,128]",
        "train.amp=bf16",
    ]
    cfg = load_config(SHAPES_CONFIG, overrides)
    assert (cfg.data.root, cfg.model.num_classes, cfg.train.epochs, cfg.train.batch_size) == ("/d", 6, 3, 4)
    assert (cfg.output_dir, cfg.train.lr, cfg.data.train_scales, cfg.train.amp) == ("runs/x", 1e-4, [96, 128], "bf16")
    assert cfg.model.backbone == "resnet18" and cfg.model.pretrained_backbone is False  # from the YAML


def test_coco_config_is_the_original_recipe() -> None:
    cfg = load_config(config_path("coco.yaml"))
    t = cfg.train
    assert (t.lr, t.lr_backbone, t.lr_linear_proj_mult, t.weight_decay) == (2e-4, 2e-5, 0.1, 1e-4)
    assert (t.epochs, t.lr_drop, t.clip_max_norm, t.batch_size) == (50, 40, 0.1, 2)
    assert t.lr_linear_proj_names == ["reference_points", "sampling_offsets"]
    d = cfg.data
    assert d.train_scales == list(range(480, 801, 32)) and d.train_max_size == 1333
    assert (d.crop, d.crop_scales, d.crop_size, d.val_size, d.val_max_size) == (
        True,
        [400, 500, 600],
        [384, 600],
        800,
        1333,
    )
    assert cfg.model.num_classes == 91 and cfg.data.synthetic == ""
    q = cfg.training_queries
    assert (q.dn_groups, q.query_groups, cfg.loss.iou_aware) == (0, 1, False)


@pytest.mark.parametrize("name", ["custom.yaml", "shapes.yaml"])
def test_small_data_recipes_train_with_denoising_only(name: str) -> None:
    """The ablation's choice (BENCHMARKS.md, "Training-only queries"): denoising on, the other two options off."""
    cfg = load_config(config_path(name))
    q = cfg.training_queries
    assert (q.dn_groups, q.query_groups, cfg.loss.iou_aware) == (5, 1, False)


def test_make_shapes_tool(tmp_path, capsys) -> None:
    root = str(tmp_path / "shapes")
    args = [SHAPES_CONFIG, f"data.root={root}", "data.synthetic_train_images=3", "data.synthetic_val_images=2"]
    assert shapes_tool.main(args) == 0
    assert sorted(os.listdir(os.path.join(root, "train2017"))) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    assert shapes_tool.main(args) == 1
    assert "already exists and holds a generated shapes data set" in (err := capsys.readouterr().err)
    assert "regenerate it with tools/make_shapes.py --force" in err
    assert shapes_tool.main([*args, "--force"]) == 0


def test_cope_channels_without_cope_offsets_is_warned_about() -> None:
    """model.cope_channels sets the counting channels of CoPE offsets: with linear offsets everywhere it does nothing,
    which a user who set it would not expect."""
    with pytest.warns(UserWarning, match=r"model.cope_channels=4 has no effect: no attention has CoPE offsets"):
        check_options(load_config(None, ["model.cope_channels=4"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_options(load_config(None, ["model.cope_channels=4", "model.dec_offset_mode=cope"]))
        check_options(load_config(None, []))
