"""Deployment: tools/export_onnx.py end to end with onnxruntime parity at other sizes and batches, torch.export with
the native op (run, save, load), torch.compile, and ``deformable.backend``."""

from __future__ import annotations

import importlib.util
import os
import re
import types
import warnings

import pytest
import torch
from _models_utils import perturb
from _repo import config_path, load_tool

import deformable
from deformable import _extension
from models import build_detector, load_config
from models.deploy import (
    ExportableDetector,
    converter_max,
    dynamic_shapes,
    example_images,
    export_program,
    input_ranges,
    load_for_export,
    min_image_side,
    onnx_max_difference,
    onnx_session,
)

# One intra-op thread for the whole module (conftest.py): the exports below are shared by its tests.
pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = config_path("coco.yaml")
# 4 levels (3 backbone maps + 1 extra stride-2 level), the smallest widths, one layer each.
TINY = [
    "model.backbone=resnet18",
    "model.pretrained_backbone=false",
    "model.hidden_dim=32",
    "model.nheads=4",
    "model.dim_feedforward=64",
    "model.enc_layers=1",
    "model.dec_layers=1",
    "model.num_queries=10",
    "model.num_classes=5",
    "model.num_feature_levels=4",
]
EXPORT_SIZE = (96, 128)  # traced with batch 2 at this size; the runs below use other sizes and batches
RUN_SHAPES = {"batch1-128x96": (1, 128, 96), "batch3-80x160": (3, 80, 160), "batch1-odd-101x75": (1, 101, 75)}
ONNX_MISSING = [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]
requires_onnx = pytest.mark.skipif(bool(ONNX_MISSING), reason=f"{ONNX_MISSING} not installed (pip install '.[export]')")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[torch.nn.Module, str]:
    """A tiny detector with every parameter perturbed (the zero-initialised attention weights and offsets would
    make the sampling trivial), and its checkpoint file."""
    torch.manual_seed(0)
    model = build_detector(load_config(CONFIG, TINY)).eval()
    perturb(model, scale=0.05)
    path = str(tmp_path_factory.mktemp("export") / "checkpoint.pth")
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return model, path


@pytest.fixture(scope="module")
def onnx_file(trained, tmp_path_factory) -> str:
    """tools/export_onnx.py on the checkpoint (it also runs onnx.checker and its own onnxruntime comparison)."""
    if ONNX_MISSING:
        pytest.skip(f"{ONNX_MISSING} not installed (pip install '.[export]')")
    path = str(tmp_path_factory.mktemp("onnx") / "exports" / "model.onnx")  # a folder the tool creates
    argv = [CONFIG, "--checkpoint", trained[1], "--out", path, "--size", *map(str, EXPORT_SIZE), *TINY]
    assert load_tool("export_onnx").main(argv) == 0
    return path


@requires_onnx
@pytest.mark.parametrize("shape", RUN_SHAPES.values(), ids=RUN_SHAPES.keys())
def test_onnxruntime_matches_pytorch_at_other_sizes(onnx_file, trained, shape):
    batch, height, width = shape
    diffs = onnx_max_difference(onnx_session(onnx_file, threads=1), trained[0], example_images(batch, height, width))
    assert max(diffs.values()) < 1e-3, diffs


@requires_onnx
def test_onnx_graph_is_dynamic_and_uses_grid_sample(onnx_file):
    import onnx

    model = onnx.load(onnx_file)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input]
    assert [v.name for v in model.graph.input] == ["images"]
    assert dims == [["batch", 3, "height", "width"]]
    assert [v.name for v in model.graph.output] == ["pred_logits", "pred_boxes"]
    assert [d.dim_param or d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim] == ["batch", 10, 4]
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 18
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" in ops
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)  # standard operators only


def test_export_onnx_tool_reports_bad_inputs(trained, tmp_path, capsys, monkeypatch):
    tool = load_tool("export_onnx")
    out = ["--out", str(tmp_path / "model.onnx")]
    assert tool.main([CONFIG, "--checkpoint", str(tmp_path / "missing.pth"), *out, *TINY]) == 1
    assert "missing.pth" in capsys.readouterr().err
    assert tool.main([CONFIG, "--checkpoint", trained[1], *out, *TINY, "model.num_classes=7"]) == 1
    assert "num_classes: the config says 7, the checkpoint 5 (override: model.num_classes=5)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # an option's value: argparse's status and usage line
        tool.main([CONFIG, "--checkpoint", trained[1], *out, "--opset", "17", *TINY])
    assert refused.value.code == 2
    assert "opset 17 is not supported" in capsys.readouterr().err
    if importlib.util.find_spec("onnx") is not None:  # past the newest opset onnx knows: refused before any export
        monkeypatch.setattr(tool, "export_onnx", lambda *args, **kwargs: pytest.fail("exported"))
        with pytest.raises(SystemExit, match="2"):
            tool.main([CONFIG, "--checkpoint", str(tmp_path / "missing.pth"), *out, "--opset", "99"])
        assert re.search(
            r"opset 99 is not supported: the installed onnx \S+ knows opsets up to \d+", capsys.readouterr().err
        )
        above = converter_max() + 1  # onnx knows it, the exporter's converter does not reach it (26 with 0.7.2)
        with pytest.raises(SystemExit, match="2"):
            tool.main([CONFIG, "--checkpoint", str(tmp_path / "missing.pth"), *out, "--opset", str(above)])
        assert f"use --opset 18..{converter_max()}" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def _smallest_level(model: torch.nn.Module, side: int) -> int:
    """The smallest side of the detector's feature levels for a ``side`` x ``side`` image (its backbone maps, then
    its extra stride-2 levels, as the detector computes them)."""
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, side, side), torch.zeros(1, side, side, dtype=torch.bool))[0]
        sizes, src = [f.shape[-1] for f in features], features[-1]
        for level in range(len(features), model.num_feature_levels):
            src = model.input_proj[level][0](src)  # its stride-2 conv (the GroupNorm after it keeps the size)
            sizes.append(src.shape[-1])
    return min(sizes)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.num_feature_levels=4"], 65),  # stride 32 map + 1 extra stride-2 level: stride 64
        (["model.num_feature_levels=3"], 33),
        (["model.num_feature_levels=1"], 33),
        (["model.num_feature_levels=5"], 129),
        (["model.backbone=resnet50", "model.dilation=true", "model.num_feature_levels=1"], 17),  # DC5: stride 16
        (["model.backbone=timm/convnext_atto"], 96),  # maps floor(side / 32): 3 px at 96, then ceil(3 / 2) = 2
    ],
    ids=["4-levels", "3-levels", "1-level", "5-levels", "dc5-1-level", "convnext-floors"],
)
def test_min_image_side_follows_the_model(overrides, expected):
    model = build_detector(load_config(CONFIG, [*TINY, *overrides])).eval()
    assert min_image_side(model) == expected
    for side, smallest in ((expected, 2), (expected - 1, 1)):  # the real modules: at one pixel less, a 1-px level
        assert _smallest_level(model, side) == smallest
    with pytest.raises(ValueError, match=rf"each side must be at least {expected} px"):
        export_program(model, example_images(2, expected - 1, 200))  # refused before tracing


def test_a_backbone_that_rounds_down_exports_from_its_own_minimum():
    """timm's ConvNeXt maps a side to floor(side / 32): traced at 96 px (its minimum) the program takes any size from
    96 up, non-square included, where a minimum derived as for a ResNet (65) traced a top level of 1 px."""
    torch.manual_seed(0)
    model = build_detector(load_config(CONFIG, [*TINY, "model.backbone=timm/convnext_atto"])).eval()
    perturb(model, scale=0.05)
    program = export_program(model, example_images(2, 96, 96))
    assert input_ranges(program)["height"] == (96, float("inf")) == input_ranges(program)["width"]
    for height, width in ((96, 133), (141, 97)):
        images = example_images(1, height, width, seed=height)
        with torch.no_grad():
            for got, expected in zip(program.module()(images), ExportableDetector(model)(images), strict=True):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tool_name", ["export_torch", "export_onnx"])
def test_export_tools_check_size_and_out_before_exporting(trained, tmp_path, capsys, tool_name):
    tool = load_tool(tool_name)

    def no_export(*args, **kwargs):
        raise AssertionError("the export started before the arguments were checked")

    tool.export_program = tool.export_onnx = no_export
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_bytes(b"kept")
    base = [CONFIG, "--checkpoint", trained[1], *TINY]
    cases = [
        (["--size", "16", "16", "--out", str(tmp_path / "m.out")], "example size 16x16 (--size H W) is too small"),
        (["--size", "0", "0", "--out", str(tmp_path / "m.out")], "each side must be at least 65 px"),
        (["--size", "-4", "96", "--out", str(tmp_path / "m.out")], "levels would be [8, 4, 2, 1] px a side at 64 px"),
        (["--out", str(tmp_path / "folder")], f"--out {tmp_path / 'folder'} is a folder"),
        (["--out", str(tmp_path / "a_file" / "m.out")], f"{tmp_path / 'a_file'} is a file, not a folder"),
        (["--out", ""], "--out is empty"),
    ]
    for argv, message in cases:
        assert tool.main([*base, *argv]) == 1
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "folder"] and os.listdir(tmp_path / "folder") == []


def test_load_for_export(trained):
    model = load_for_export(load_config(CONFIG, TINY), trained[1])
    assert not model.training
    for name, tensor in trained[0].state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    with pytest.warns(UserWarning, match="random weights"):
        load_for_export(load_config(CONFIG, TINY), None)


@pytest.fixture(scope="module")
def program(trained) -> torch.export.ExportedProgram:
    return export_program(trained[0], example_images(2, *EXPORT_SIZE))


def _assert_matches_eager(run, model: torch.nn.Module, shape: tuple[int, int, int]) -> None:
    images = example_images(*shape, seed=3)
    with torch.no_grad():
        got, expected = run(images), ExportableDetector(model)(images)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_torch_export_runs_at_other_sizes_and_round_trips(program, trained, tmp_path):
    if _extension.native_available():  # the native op stays one node, through its fake kernel
        assert "deformable.ms_deform_attn" in str(program.graph)
    else:
        warnings.warn("deformable._C is not built: torch.export was tested through the PyTorch path", stacklevel=1)
    ranges = input_ranges(program)
    assert ranges["batch"] == (1, float("inf"))
    assert ranges["height"] == ranges["width"] == (65, float("inf"))  # the stride-64 level at least 2 px
    for shape in ((1, 128, 96), (3, 80, 160)):
        _assert_matches_eager(program.module(), trained[0], shape)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    _assert_matches_eager(loaded.module(), trained[0], (1, 128, 96))


def test_torch_compile_matches_eager(trained):
    # aot_eager runs what inductor sees (dynamo graph, fake kernel, AOTAutograd) in a few seconds; inductor itself
    # takes minutes on a small CPU (verified by hand, see the README's Deployment section).
    compiled = torch.compile(ExportableDetector(trained[0]), backend="aot_eager", fullgraph=True)
    for shape in ((2, 96, 128), (1, 128, 96)):  # the second size recompiles with dynamic sizes
        _assert_matches_eager(compiled, trained[0], shape)


def test_backend_context_manager_selects_and_restores(monkeypatch):
    monkeypatch.delenv("DEFORMABLE_BACKEND", raising=False)
    with deformable.backend("pytorch"):
        assert not deformable.native_available()
        with deformable.backend("native"):
            assert "DEFORMABLE_BACKEND" not in os.environ
        assert os.environ["DEFORMABLE_BACKEND"] == "pytorch"
    assert "DEFORMABLE_BACKEND" not in os.environ
    monkeypatch.setenv("DEFORMABLE_BACKEND", "pytorch")
    with deformable.backend("native"):
        assert deformable.native_available() == _extension.extension_loaded()
    assert os.environ["DEFORMABLE_BACKEND"] == "pytorch"
    with pytest.raises(ValueError, match="must be one of native, pytorch"):
        with deformable.backend("cuda"):
            pass


def test_export_torch_fails_when_the_loaded_program_differs_from_eager(trained, tmp_path, capsys, monkeypatch):
    """The comparison of the written program with the eager model is a check, as export_onnx's is: exit status 1
    beyond --atol (here an eager reference moved by 1)."""
    tool = load_tool("export_torch")

    class Moved(ExportableDetector):
        def forward(self, images):
            logits, boxes = super().forward(images)
            return logits + 1.0, boxes

    monkeypatch.setattr(tool, "ExportableDetector", Moved)
    argv = [CONFIG, "--checkpoint", trained[1], *TINY, "--size", "72", "72", "--out", str(tmp_path / "m.pt2")]
    assert tool.main(argv) == 1
    out, err = capsys.readouterr()
    assert "max |difference| pred_logits 1.00e+00, pred_boxes 0.00e+00" in out
    assert "error: the loaded program and eager differ by more than --atol 0.001" in err


@pytest.mark.parametrize("tool_name", ["export_torch", "export_onnx"])
def test_export_tools_name_an_out_that_cannot_be_written(trained, tmp_path, capsys, monkeypatch, tool_name):
    """A write that fails after the export (a full disk; a file system that refuses the temporary file): one error
    line naming --out, not a traceback."""
    tool = load_tool(tool_name)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    if tool_name == "export_torch":
        monkeypatch.setattr(tool, "atomic_write", full_disk)
    else:
        monkeypatch.setattr(tool, "export_onnx", full_disk)  # writes through atomic_save
    out = tmp_path / "m.out"
    argv = [CONFIG, "--checkpoint", trained[1], *TINY, "--size", "72", "72", "--out", str(out)]
    assert tool.main(argv) == 1
    assert f"error: --out {out} could not be written: [Errno 28] No space left on device" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["export_onnx", "export_torch"])
def test_an_export_on_a_torch_too_old_for_it_says_so_first(name, tmp_path, monkeypatch, capsys) -> None:
    tool = load_tool(name)
    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    monkeypatch.setattr(torch.export, "Dim", types.SimpleNamespace(DYNAMIC=object()))  # 2.7's: takes no minimum
    monkeypatch.setattr(tool, "load_for_export", lambda *a, **k: pytest.fail("the model was loaded"))
    assert tool.main([CONFIG, "--out", str(tmp_path / "m.out"), "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    err = capsys.readouterr().err
    assert "exporting needs torch >= 2.8" in err and "this is torch 2.7.1+cu126" in err and "missing" not in err
    with pytest.raises(ValueError, match="exporting needs torch >= 2.8"):
        dynamic_shapes(64)
    assert os.listdir(tmp_path) == []
