"""The detector with CoPE offsets: the gates keep their own initialisation; torch.compile and ONNX export."""

import importlib.util

import pytest
import torch

import deformable
from deformable import MSDeformAttn
from models import build_detector, load_config
from models.config import ConfigError
from models.deploy import ExportableDetector, export_onnx, export_program, has_cope, input_ranges, onnx_session

TINY = [
    "model.pretrained_backbone=false",
    "model.hidden_dim=32",
    "model.dim_feedforward=32",
    "model.enc_layers=1",
    "model.dec_layers=1",
    "model.num_queries=5",
    "model.nheads=4",
    "model.enc_offset_mode=cope",
    "model.dec_offset_mode=cope",
]


def test_detector_keeps_cope_gate_initialisation():
    torch.manual_seed(0)
    model = build_detector(load_config("configs/shapes.yaml", TINY))
    attns = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    assert len(attns) == 2 and all(m.offset_mode == "cope" for m in attns)
    for attn in attns:
        expected = {k: v.clone() for k, v in attn.cope.state_dict().items()}
        attn.cope.reset_parameters()
        for name, value in attn.cope.state_dict().items():
            if name in ("gate_key.weight", "channel_mix.weight"):  # random (xavier): compare statistics only
                continue
            torch.testing.assert_close(value, expected[name], msg=f"cope.{name} was overwritten by the detector")


def test_cope_channels_reach_every_cope_module_and_only_those():
    torch.manual_seed(0)
    options = [o for o in TINY if o != "model.enc_offset_mode=cope"] + ["model.cope_channels=3"]
    model = build_detector(load_config("configs/shapes.yaml", options))
    attns = {m.offset_mode: m for m in model.modules() if isinstance(m, MSDeformAttn)}
    assert attns["cope"].cope.channels == 3 and attns["cope"].cope.gate_query.shape == (4, 3, 8)
    assert attns["linear"].cope is None


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("model.enc_offset_mode=cop", "'model.enc_offset_mode' must be one of linear, cope, got 'cop'"),
        ("model.dec_offset_mode=Linear", "'model.dec_offset_mode' must be one of linear, cope, got 'Linear'"),
        ("model.cope_channels=0", "'model.cope_channels' must be an integer >= 1, got 0"),
    ],
)
def test_bad_cope_options_are_config_errors(option, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/shapes.yaml", [option])


def _cope_detector() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector(load_config("configs/shapes.yaml", TINY)).eval()
    with torch.no_grad():  # gates away from their initial value, so that the contextual path does real work
        for attn in (m for m in model.modules() if isinstance(m, MSDeformAttn)):
            attn.cope.gate_query.normal_(std=0.02)
    return ExportableDetector(model).eval()


def test_cope_detector_compiles_with_fullgraph():
    model = _cope_detector()
    images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(images)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.skipif(
    any(importlib.util.find_spec(n) is None for n in ("onnx", "onnxruntime", "onnxscript")), reason="needs onnx"
)
def test_cope_detector_exports_to_onnx_with_dynamic_sizes(tmp_path):
    """Through the PyTorch path (deformable.backend("pytorch")): grid_sample and, for the contextual offsets, a
    segment search by comparisons, which every ONNX runtime has. Batch, height and width stay symbolic: the file
    runs at another batch and size than it was traced with."""
    model = _cope_detector().detector
    traced = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    export_onnx(model, tmp_path / "cope.onnx", traced)
    session = onnx_session(str(tmp_path / "cope.onnx"), threads=1)
    for images in (traced, torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(3))):
        with deformable.backend("pytorch"), torch.no_grad():
            expected = ExportableDetector(model)(images)
        got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-4)


def test_cope_detector_exports_with_torch_export_and_dynamic_sizes():
    model = _cope_detector().detector
    assert has_cope(model) and not has_cope(build_detector(load_config("configs/shapes.yaml", TINY[:-2])))
    program = export_program(model, torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2)))
    assert set(input_ranges(program)) == {"batch", "height", "width"}
    with torch.no_grad():
        for shape in ((2, 3, 96, 128), (1, 3, 160, 192), (3, 3, 128, 96)):
            images = torch.rand(*shape, generator=torch.Generator().manual_seed(4))
            for g, e in zip(program.module()(images), ExportableDetector(model)(images), strict=True):
                torch.testing.assert_close(g, e)
