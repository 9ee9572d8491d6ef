"""The detector with CoPE offsets: the gates keep their own initialisation; torch.compile and ONNX export."""

import importlib.util

import pytest
import torch

import deformable
from deformable import MSDeformAttn
from models import build_detector, load_config
from models.deploy import ExportableDetector, export_program, fixed_size, input_ranges, onnx_session

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
def test_cope_detector_exports_to_onnx_at_a_fixed_size(tmp_path):
    """Through the PyTorch path (deformable.backend("pytorch")): grid_sample and, for the contextual offsets, a
    segment search by comparisons, which every ONNX runtime has."""
    model = _cope_detector()
    images = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    with deformable.backend("pytorch"):
        with torch.no_grad():
            expected = model(images)
        torch.onnx.export(model, (images,), dynamo=True, opset_version=18).save(str(tmp_path / "cope.onnx"))
    session = onnx_session(str(tmp_path / "cope.onnx"), threads=1)
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-4)


def test_cope_detector_exports_with_torch_export_at_its_traced_size():
    model = _cope_detector().detector
    assert fixed_size(model) and not fixed_size(build_detector(load_config("configs/shapes.yaml", TINY[:-2])))
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    program = export_program(model, images)
    assert input_ranges(program) == {}  # no symbolic size: batch, height and width are the traced ones
    with torch.no_grad():
        for g, e in zip(program.module()(images), ExportableDetector(model)(images), strict=True):
            torch.testing.assert_close(g, e)
