"""Export of two-stage detectors: the encoder must have at least ``num_queries`` positions (its proposals), so the
smallest accepted image side can be above the every-level-2-px one. The computed minimum against the model's own
forward, the tools' refusal of a smaller ``--size``, and the accepted sizes that the tools state."""

from __future__ import annotations

import os

import pytest
import torch
from _models_utils import VARIANTS, perturb, tiny_config
from _repo import load_tool

from models import build_detector
from models.config import config_to_dict
from models.deploy import (
    ExportableDetector,
    example_images,
    export_size_reason,
    feature_levels,
    min_export_side,
)

pytestmark = pytest.mark.usefixtures("one_thread")
QUERIES = 300  # the original's and transformers' default proposal count
MIN_SIDE = 113  # 300 queries, 4 levels of strides 8..64: 309 positions at 113x113, 265 at 112x112


def two_stage(*overrides: str) -> torch.nn.Module:
    """A tiny two-stage detector (box refinement, 4 levels unless overridden) with ``QUERIES`` queries, eval mode."""
    torch.manual_seed(0)
    model = build_detector(tiny_config(*VARIANTS["two_stage"], f"model.num_queries={QUERIES}", *overrides)).eval()
    perturb(model, scale=0.05)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A checkpoint of :func:`two_stage` with its config, so that the tools need no config file."""
    model = two_stage()
    path = str(tmp_path_factory.mktemp("two_stage") / "checkpoint.pth")
    config = config_to_dict(tiny_config(*VARIANTS["two_stage"], f"model.num_queries={QUERIES}"))
    torch.save({"model": model.state_dict(), "config": config, "epoch": 1}, path)
    return path


@pytest.mark.parametrize(
    "overrides",
    [["model.num_feature_levels=4"], ["model.num_feature_levels=3"], ["model.num_feature_levels=1"],
     ["model.num_feature_levels=5"], ["model.backbone=timm/convnext_atto"]],
    ids=["4-levels", "3-levels", "1-level", "5-levels", "convnext"],
)  # fmt: skip
def test_encoder_positions_match_the_model(overrides):
    model = two_stage(*overrides, "model.num_queries=4")  # 9 positions at 65 px
    levels = feature_levels(model)
    for height, width in ((97, 97), (97, 130), (129, 71)):  # odd sides: a ResNet rounds up, a ConvNeXt down
        with torch.no_grad():
            out = model(example_images(1, height, width))
        heights, widths = levels.sides(height), levels.sides(width)
        assert out["enc_outputs"]["pred_logits"].shape[1] == sum(h * w for h, w in zip(heights, widths, strict=True))
        assert levels.positions(height, width) == out["enc_outputs"]["pred_logits"].shape[1]


@pytest.mark.parametrize(
    ("overrides", "queries", "expected"),
    [
        ([], QUERIES, MIN_SIDE),
        ([], 150, 81),
        ([], 900, 201),
        (["model.num_feature_levels=1"], 10, 97),  # 1 level: 9 positions at 96 px
        (["model.backbone=timm/convnext_atto"], QUERIES, 128),  # rounds down: 287 positions at 127 px, 340 at 128
    ],
    ids=["300-queries", "150-queries", "900-queries", "1-level-10-queries", "convnext-300-queries"],
)
def test_min_export_side_is_the_smallest_side_that_runs(overrides, queries, expected):
    model = two_stage(f"model.num_queries={queries}", *overrides)
    assert min_export_side(model) == expected
    assert f"num_queries={queries}" in export_size_reason(model)
    with torch.no_grad():
        assert ExportableDetector(model)(example_images(1, expected, expected))[0].shape == (1, queries, 5)
        with pytest.raises(ValueError, match=rf"num_queries={queries} proposals but the encoder has only"):
            model(example_images(1, expected - 1, expected - 1))


def test_few_queries_keep_the_every_level_2_px_minimum():
    model = two_stage("model.num_queries=10")
    assert min_export_side(model) == 65  # 85 positions at 64 px: the 1-px top level is what limits
    assert export_size_reason(model) == "every feature level at least 2 px"


@pytest.mark.parametrize("tool_name", ["export_torch", "export_onnx"])
@pytest.mark.parametrize("size", [(MIN_SIDE - 1, MIN_SIDE - 1), (96, 400)], ids=["too-few-positions", "narrow"])
def test_export_tools_refuse_a_size_below_the_two_stage_minimum(checkpoint, tmp_path, capsys, tool_name, size):
    tool = load_tool(tool_name)

    def no_export(*args, **kwargs):
        raise AssertionError("the export started before the size was checked")

    tool.export_program = tool.export_onnx = no_export
    argv = ["--checkpoint", checkpoint, "--out", str(tmp_path / "out" / "model"), "--size", *map(str, size)]
    assert tool.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: example size {size[0]}x{size[1]} (--size H W) is too small for this two-stage")
    assert err.count("\n") == 1  # one line, no traceback
    assert f"each side must be at least {MIN_SIDE} px" in err and f"num_queries={QUERIES} proposals" in err
    assert os.listdir(tmp_path) == []


def test_export_onnx_states_the_two_stage_minimum(checkpoint, tmp_path, capsys):
    tool = load_tool("export_onnx")
    out = tmp_path / "model.onnx"
    tool.export_onnx = lambda model, path, images, opset: out.write_bytes(b"stub")  # the line, not the exporter
    tool.check_onnx = lambda path: None
    tool.verify = lambda *args: True
    assert tool.main(["--checkpoint", checkpoint, "--out", str(out), "--size", str(MIN_SIDE), "128"]) == 0
    stated = f"accepted sizes: batch 1..inf, height {MIN_SIDE}..inf, width {MIN_SIDE}..inf (two-stage: its num_queries"
    assert stated in capsys.readouterr().out


def test_torch_program_states_and_enforces_the_two_stage_minimum(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    assert load_tool("export_torch").main(["--checkpoint", checkpoint, "--out", str(out), "--size", "120", "128"]) == 0
    stated = f"accepted sizes: batch 1..inf, height {MIN_SIDE}..inf, width {MIN_SIDE}..inf (two-stage: its num_queries"
    assert stated in capsys.readouterr().out
    program, model = torch.export.load(out).module(), two_stage()
    images = example_images(1, MIN_SIDE, MIN_SIDE)
    with torch.no_grad():
        for got, expected in zip(program(images), ExportableDetector(model)(images), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # Refused by the stated minimum, not by a guard on the sum of the level sizes.
        with pytest.raises((AssertionError, RuntimeError), match=rf"images.size\(\)\[2\] >= {MIN_SIDE}"):
            program(example_images(1, MIN_SIDE - 1, 300))
