"""deformable.recording: records what the op received, changes nothing, cleans up; CoPE line densities."""

from __future__ import annotations

import pytest
import torch
from _viz_utils import tiny_model

import deformable
import deformable.modules
from deformable import MSDeformAttn, cope_line_densities, recording
from deformable.cope_locate import cope_locate_lines
from deformable.cope_sampling import cumulative_counts

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["transformer.encoder.layers.0.self_attn", "transformer.decoder.layers.0.cross_attn"]
NAMES.append("transformer.decoder.layers.1.cross_attn")


@pytest.fixture
def spy(monkeypatch) -> list[dict]:
    """Every call of the op inside MSDeformAttn.forward, with its arguments."""
    calls: list[dict] = []
    op = deformable.modules.ms_deform_attn

    def recorded_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        calls.append({"locations": sampling_locations.clone(), "weights": attention_weights.clone()})
        calls[-1]["spatial_shapes"] = spatial_shapes.clone()
        return op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    monkeypatch.setattr(deformable.modules, "ms_deform_attn", recorded_op)
    return calls


def test_records_what_the_op_received(spy) -> None:
    model = tiny_model()
    images, mask = torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    with torch.no_grad(), recording(model) as records:
        model(images, mask)
    assert list(records) == NAMES  # in call order, keyed by module name
    assert len(spy) == len(records)
    for record, call in zip(records.values(), spy, strict=True):
        assert torch.equal(record.sampling_locations, call["locations"])
        assert torch.equal(record.attention_weights, call["weights"])
        assert torch.equal(record.spatial_shapes, call["spatial_shapes"])
    enc, dec = records[NAMES[0]], records[NAMES[-1]]
    s = int(enc.spatial_shapes.prod(1).sum())
    assert enc.sampling_locations.shape == (2, s, 2, 2, 4, 2) and enc.reference_points.shape == (2, s, 2, 2)
    assert dec.sampling_locations.shape == (2, 5, 2, 2, 4, 2) and dec.attention_weights.shape == (2, 5, 2, 2, 4)
    assert dec.padding_mask.shape == (2, s) and dec.query.shape == (2, 5, 32) and dec.input_flatten.shape == (2, s, 32)
    ratios = dec.valid_ratios()
    assert torch.equal(ratios[0], torch.ones(2, 2)) and float(ratios[1, 0, 0]) < 1 and float(ratios[1, 0, 1]) == 1


def test_recording_changes_no_output_and_cleans_up() -> None:
    model = tiny_model()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)
        with recording(model) as records:
            recorded = model(images)
    assert torch.equal(plain["pred_logits"], recorded["pred_logits"])
    assert torch.equal(plain["pred_boxes"], recorded["pred_boxes"])
    with recording(model) as with_grad:  # with autograd: the records are detached
        model(images)["pred_boxes"].sum().backward()
    assert not with_grad[NAMES[0]].sampling_locations.requires_grad
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            assert module.record is False and module.last_sampling is None and not module._forward_hooks
    assert len(records) == 3  # what was recorded stays available after the block


def test_recording_a_bare_module_with_keyword_arguments() -> None:
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    shapes, starts = torch.tensor([[4, 5]]), torch.tensor([0])
    ref = torch.rand(1, 3, 1, 2)
    with recording(attn) as records:
        attn(torch.randn(1, 3, 16), ref, torch.randn(1, 20, 16), shapes, input_level_start_index=starts)
    (record,) = records.values()
    assert list(records) == [""] and record.padding_mask is None and torch.equal(record.reference_points, ref)
    assert torch.equal(record.valid_ratios(), torch.ones(1, 1, 2))


def test_cope_line_densities_reproduce_the_recorded_locations() -> None:
    torch.manual_seed(0)
    # One counting channel: the mixed density is then exactly the one the points are placed on.
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3, offset_mode="cope", cope_channels=1)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # gates and offsets away from their initial values
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    mask = torch.zeros(1, 60, dtype=torch.bool)
    mask[0, 40:48] = True  # the last row of level 0 is padding
    query_index = 2
    with torch.no_grad(), recording(attn) as records:
        attn(torch.randn(1, 4, 16), torch.rand(1, 4, 2, 2) * 0.8, torch.randn(1, 60, 16), shapes, starts, mask)
    record = records[""]
    densities = cope_line_densities(attn, record, 0, query_index)
    for lvl, (h, w) in enumerate(shapes.tolist()):
        row_density, col_density = densities[lvl]
        assert row_density.shape == (2, w) and col_density.shape == (2, h)
        ref = record.reference_points[0, query_index, lvl]
        for axis, (density, size) in enumerate(((row_density, w), (col_density, h))):
            u = record.sampling_offsets[0, query_index, :, lvl, :, axis]  # (M, P)
            lines, one = torch.arange(2)[:, None], torch.ones(2, 1)
            edge = cope_locate_lines(cumulative_counts(density), lines, (ref[axis] * size).expand(2), u, one)
            expected = record.sampling_locations[0, query_index, :, lvl, :, axis]
            torch.testing.assert_close(edge / size, expected, atol=1e-5, rtol=1e-5)
    assert (densities[0][1][:, 5] == 1.0).all()  # padded pixels count one each, as outside the map


def test_cope_line_densities_needs_cope() -> None:
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    with recording(attn) as records:
        attn(
            torch.randn(1, 1, 16),
            torch.rand(1, 1, 1, 2),
            torch.randn(1, 4, 16),
            torch.tensor([[2, 2]]),
            torch.tensor([0]),
        )
    with pytest.raises(ValueError, match="offset_mode='cope'"):
        cope_line_densities(attn, records[""], 0, 0)
