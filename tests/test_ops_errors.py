"""ms_deform_attn rejects bad input with an exception that names the problem, on the native path, on the PyTorch
path (``DEFORMABLE_BACKEND=pytorch``) and in direct ``torch.ops.deformable`` calls (the C++ checks)."""

from __future__ import annotations

import pytest
import torch
from _ops_utils import requires_native, sample_inputs

from deformable import ms_deform_attn, ms_deform_attn_pytorch

# The default sample: N=2, Lq=3, M=2, D=4, levels (3, 4), (1, 5), (4, 1) so S=21 and starts (0, 12, 17), P=2.


def _replace(**changes):
    """A function of the sample inputs returning them with some replaced, by name."""
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")

    def make(inputs):
        current = dict(zip(names, inputs, strict=True))
        return [changes[n](current) if n in changes else current[n] for n in names]

    return make


# id: (change, (native exception, native message), (pytorch exception, pytorch message)); same message when one.
BOTH = "both"
CASES = {
    "value-rank": (
        _replace(value=lambda c: c["value"][0]),
        ValueError,
        r"value must have shape \(N, S, M, D\), got shape \(21, 2, 4\)",
        BOTH,
    ),
    "locations-rank": (
        _replace(sampling_locations=lambda c: c["sampling_locations"][..., 0, :]),
        ValueError,
        r"sampling_locations must have shape \(N, Lq, M, L, P, 2\), got shape \(2, 3, 2, 3, 2\)",
        BOTH,
    ),
    "weights-rank": (
        _replace(attention_weights=lambda c: c["attention_weights"].flatten(-2)),
        ValueError,
        r"attention_weights must have shape \(N, Lq, M, L, P\), got shape \(2, 3, 2, 6\)",
        BOTH,
    ),
    "batch": (
        _replace(
            sampling_locations=lambda c: c["sampling_locations"][:1],
            attention_weights=lambda c: c["attention_weights"][:1],
        ),
        ValueError,
        "sampling_locations batch size 1 does not match value batch size 2",
        BOTH,
    ),
    "heads": (
        _replace(value=lambda c: c["value"].repeat(1, 1, 2, 1)),
        ValueError,
        "sampling_locations has 2 heads but value has 4",
        BOTH,
    ),
    "levels": (
        _replace(
            sampling_locations=lambda c: c["sampling_locations"][:, :, :, :2],
            attention_weights=lambda c: c["attention_weights"][:, :, :, :2],
        ),
        RuntimeError,
        "sampling_locations has 2 levels but spatial_shapes describes 3",
        (ValueError, "spatial_shapes describes 3 levels, sampling_locations has 2"),
    ),
    "last-dim": (
        _replace(sampling_locations=lambda c: torch.cat([c["sampling_locations"]] * 2, -1)[..., :3]),
        ValueError,
        r"last dimension of sampling_locations must be 2 \(x, y\), got 3",
        BOTH,
    ),
    "weights-shape": (
        _replace(attention_weights=lambda c: c["attention_weights"][..., :1]),
        ValueError,
        r"attention_weights has shape \(2, 3, 2, 3, 1\) but sampling_locations .* requires "
        r"\(N, Lq, M, L, P\) = \(2, 3, 2, 3, 2\)",
        BOTH,
    ),
    "positions": (
        _replace(value=lambda c: c["value"][:, :20]),
        RuntimeError,
        r"spatial_shapes sum to 21 positions \(sum of H\*W\) but value has S = 20 positions",
        (ValueError, r"spatial_shapes sum to 21 positions \(sum of H\*W\) but value has S = 20 positions"),
    ),
    "negative-size": (  # (-3) * (-4) = 12 keeps the sum right: only the sign is wrong
        _replace(spatial_shapes=lambda c: -c["spatial_shapes"] * torch.tensor([[1], [-1], [-1]])),
        RuntimeError,
        r"spatial_shapes\[0\] = \(-3, -4\) has a negative size",
        (ValueError, r"spatial_shapes \[\(-3, -4\), \(1, 5\), \(4, 1\)\] has a negative size"),
    ),
    "int-value": (
        _replace(value=lambda c: c["value"].int()),
        TypeError,
        "value must be a floating-point tensor, got torch.int32",
        BOTH,
    ),
    "int-locations": (
        _replace(sampling_locations=lambda c: c["sampling_locations"].long()),
        TypeError,
        "sampling_locations must be a floating-point tensor, got torch.int64",
        BOTH,
    ),
    "other-device": (
        _replace(sampling_locations=lambda c: c["sampling_locations"].to("meta")),
        ValueError,
        r"inputs are on different devices \(value cpu, sampling_locations meta, attention_weights cpu",
        BOTH,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_inputs(case, backend):
    change, native_error, native_message, pytorch = case
    error, message = (native_error, native_message) if backend == "native" or pytorch == BOTH else pytorch
    with pytest.raises(error, match=message):
        ms_deform_attn(*change(sample_inputs()))


# Checked by the native op only: the PyTorch path takes (H, W) from spatial_shapes as Python ints and does not use
# level_start_index, so it accepts these and computes the right result (asserted below).
NATIVE_ONLY = {
    "start-index": (
        _replace(level_start_index=lambda c: c["level_start_index"] + torch.tensor([0, 1, 0])),
        r"level_start_index\[1\] = 13 is inconsistent with spatial_shapes \(expected 12\)",
    ),
    "start-index-length": (
        _replace(level_start_index=lambda c: c["level_start_index"][:2]),
        "level_start_index has 2 entries but spatial_shapes describes 3 levels",
    ),
    "int32-shapes": (
        _replace(spatial_shapes=lambda c: c["spatial_shapes"].int()),
        "spatial_shapes must be int64, got Int",
    ),
    "int32-starts": (
        _replace(level_start_index=lambda c: c["level_start_index"].int()),
        "level_start_index must be int64, got Int",
    ),
}


@requires_native
@pytest.mark.parametrize("case", NATIVE_ONLY.values(), ids=NATIVE_ONLY.keys())
def test_bad_level_tensors_native(case):
    change, message = case
    with pytest.raises(RuntimeError, match=message):
        ms_deform_attn(*change(sample_inputs()))


@pytest.mark.parametrize("case", NATIVE_ONLY.values(), ids=NATIVE_ONLY.keys())
def test_pytorch_path_ignores_level_start_index_and_accepts_int32_shapes(case, monkeypatch):
    monkeypatch.setenv("DEFORMABLE_BACKEND", "pytorch")
    inputs = sample_inputs()
    torch.testing.assert_close(ms_deform_attn(*case[0](inputs)), ms_deform_attn_pytorch(*inputs))


@requires_native
@pytest.mark.parametrize(
    ("call", "name"),
    [("function", "spatial_shapes"), ("function", "level_start_index"), ("op", "sampling_locations")],
)
def test_input_on_another_device(call, name):
    inputs = _replace(**{name: lambda c: c[name].to("meta")})(sample_inputs())
    fn = ms_deform_attn if call == "function" else torch.ops.deformable.ms_deform_attn
    with pytest.raises((ValueError, RuntimeError), match=f"{name} is on meta|different devices"):
        fn(*inputs)


# Direct calls skip the Python checks and the dtype casts of deformable.ms_deform_attn: the C++ checks answer.
DIRECT = {
    "float64-locations": (
        _replace(value=lambda c: c["value"].float(), attention_weights=lambda c: c["attention_weights"].float()),
        r"sampling_locations must be Float for value of dtype Float, got Double \(deformable.ms_deform_attn casts",
    ),
    "float64-weights": (
        _replace(value=lambda c: c["value"].float(), sampling_locations=lambda c: c["sampling_locations"].float()),
        "attention_weights must be Float for value of dtype Float, got Double",
    ),
    "bfloat16-locations": (
        _replace(
            value=lambda c: c["value"].bfloat16(), sampling_locations=lambda c: c["sampling_locations"].bfloat16()
        ),
        "sampling_locations must be Float for value of dtype BFloat16, got BFloat16",
    ),
    "value-rank": (_replace(value=lambda c: c["value"][0]), r"value must have shape \(N, S, M, D\), got 3 dims"),
    "int-value": (_replace(value=lambda c: c["value"].int()), "value must be a floating-point tensor, got Int"),
    "shapes-rank": (
        _replace(spatial_shapes=lambda c: c["spatial_shapes"].flatten()),
        r"spatial_shapes must have shape \(L, 2\) with rows \(H, W\), got shape \[6\]",
    ),
    "starts-rank": (
        _replace(level_start_index=lambda c: c["level_start_index"][None]),
        r"level_start_index must have shape \(L,\), got shape \[1, 3\]",
    ),
    "no-levels": (
        _replace(
            spatial_shapes=lambda c: c["spatial_shapes"][:0],
            level_start_index=lambda c: c["level_start_index"][:0],
            value=lambda c: c["value"][:, :0],
            sampling_locations=lambda c: c["sampling_locations"][:, :, :, :0],
            attention_weights=lambda c: c["attention_weights"][:, :, :, :0],
        ),
        "spatial_shapes must describe at least one level",
    ),
    "heads": (
        _replace(value=lambda c: c["value"].repeat(1, 1, 2, 1)),
        "sampling_locations has 2 heads but value has 4",
    ),
    "batch": (
        _replace(value=lambda c: c["value"][:1]),
        "sampling_locations batch size 2 does not match value batch size 1",
    ),
    "weights-shape": (
        _replace(attention_weights=lambda c: c["attention_weights"][:, :1]),
        r"attention_weights has shape \[2, 1, 2, 3, 2\] but sampling_locations",
    ),
    "last-dim": (
        _replace(sampling_locations=lambda c: torch.cat([c["sampling_locations"]] * 2, -1)[..., :3]),
        "last dimension of sampling_locations must be 2",
    ),
}


@requires_native
@pytest.mark.parametrize("case", DIRECT.values(), ids=DIRECT.keys())
def test_direct_op_call_checks(case):
    change, message = case
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deformable.ms_deform_attn(*change(sample_inputs()))


@requires_native
@pytest.mark.parametrize(
    ("grad_output", "message"),
    [
        (torch.zeros(2, 3, 7, dtype=torch.float64), r"grad_output has shape \[2, 3, 7\], expected \[2, 3, 8\]"),
        (torch.zeros(2, 3, 8, dtype=torch.float32), "grad_output dtype Float does not match value dtype Double"),
    ],
)
def test_direct_backward_call_checks(grad_output, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deformable.ms_deform_attn_backward(grad_output, *sample_inputs())


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (torch.tensor([4, 6]), r"spatial_shapes must have shape \(L, 2\), \(H, W\) per level, got shape \(2,\)"),
        (torch.tensor([[4, 6, 1], [2, 3, 1]]), r"spatial_shapes must have shape \(L, 2\).* got shape \(2, 3\)"),
        ([(4, 6), (2,)], r"spatial_shapes must hold \(H, W\) pairs"),
    ],
)
def test_malformed_spatial_shapes_are_named_on_the_pytorch_path(shapes, message, monkeypatch):
    monkeypatch.setenv("DEFORMABLE_BACKEND", "pytorch")
    value, _, starts, locations, weights = sample_inputs()
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(value, shapes, starts, locations, weights)


def test_no_level_at_all_is_named():
    value, shapes, starts, locations, weights = sample_inputs()
    with pytest.raises(ValueError, match=r"sampling_locations has no level \(L = 0\)"):
        ms_deform_attn_pytorch(value, shapes[:0], starts[:0], locations[:, :, :, :0], weights[:, :, :, :0])
