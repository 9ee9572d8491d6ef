"""ms_deform_attn on CUDA: parity with the float64 CPU reference for every dtype and many head sizes, gradcheck,
opcheck, strided, misaligned, empty and non-finite input, streams, autocast and the deterministic-algorithms
error. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from _ops_utils import (
    HALF_TYPES,
    assert_close_scaled,
    noncontiguous,
    output_and_grads,
    random_grad,
    reference_output_and_grads,
    sample_inputs,
)

from deformable import MSDeformAttn, _extension, ms_deform_attn

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RTOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float64, torch.float32, *HALF_TYPES]


@pytest.fixture(autouse=True)
def cuda_kernel() -> None:
    # test_ops_autograd.py::test_cuda_kernel_is_built fails for a GPU machine with a CPU-only build.
    if not _extension.native_supports("cuda"):
        pytest.skip(f"deformable._C has no CUDA kernel (built for: {_extension.build_info()!r})")


def _check(inputs, rtol: float, grads: bool = True) -> None:
    out, grad = output_and_grads(ms_deform_attn, inputs)
    assert out.is_cuda and out.dtype == inputs[0].dtype
    ref, ref_grad = reference_output_and_grads(inputs, random_grad(out))
    assert_close_scaled(out, ref, rtol, "output")
    if grads:
        names = ("value", "sampling_locations", "attention_weights")
        for name, g, r, t in zip(names, grad, ref_grad, (inputs[0], inputs[3], inputs[4]), strict=True):
            assert g.is_cuda and g.dtype == t.dtype, name
            assert_close_scaled(g, r, rtol, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [1, 3, 24, 32, 64, 256, 512])
def test_matches_reference(channels, dtype):
    inputs = sample_inputs(batch=2, queries=7, heads=2, channels=channels, points=4, dtype=dtype, device="cuda")
    _check(inputs, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_of_five_with_realistic_sizes(dtype):
    # The original needed im2col_step to divide the batch; here any batch goes. 8 heads of 32 channels, 4 levels.
    inputs = sample_inputs(
        batch=5, queries=300, heads=8, channels=32, shapes=((20, 30), (10, 15), (5, 8), (3, 4)), points=4,
        dtype=dtype, device="cuda", seed=5,
    )  # fmt: skip
    _check(inputs, RTOL[dtype])


@pytest.mark.parametrize("locations", ["inside", "border", "edges"])
@pytest.mark.parametrize("channels", [3, 32])
def test_matches_the_cpu_kernel(locations, channels):
    inputs = sample_inputs(channels=channels, points=4, locations=locations, device="cuda")
    cpu_inputs = tuple(t.cpu() for t in inputs)
    torch.testing.assert_close(ms_deform_attn(*inputs).cpu(), ms_deform_attn(*cpu_inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [3, 32])
def test_gradcheck(channels):
    value, spatial_shapes, level_start_index, loc, weights = sample_inputs(
        batch=2, queries=2, channels=channels, device="cuda", kink_margin=1e-3, requires_grad=True
    )

    def fn(v, locs, w):
        return ms_deform_attn(v, spatial_shapes, level_start_index, locs, w)

    # Atomic adds make the backward's rounding vary from run to run: allow that in the reentrancy check.
    assert torch.autograd.gradcheck(fn, (value, loc, weights), nondet_tol=1e-10)


def test_opcheck():
    args = list(sample_inputs(dtype=torch.float32, device="cuda", requires_grad=True))
    torch.library.opcheck(torch.ops.deformable.ms_deform_attn.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_op_matches_eager(backend):
    # fullgraph on CUDA: the fake kernels and autograd registration, and inductor's stride checks on real outputs.
    inputs = sample_inputs(dtype=torch.float32, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(ms_deform_attn, fullgraph=True, backend=backend)
    out, grads = output_and_grads(compiled, inputs)
    ref, ref_grads = output_and_grads(ms_deform_attn, inputs)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)  # atomics: summation order varies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_noncontiguous_inputs(dtype):
    inputs = sample_inputs(batch=2, queries=5, heads=2, channels=32, points=3, dtype=dtype, device="cuda")
    strided = noncontiguous(inputs)
    assert not any(t.is_contiguous() for t in strided)
    go = torch.randn(64, 5, 2, device="cuda", dtype=dtype).transpose(0, 2)
    out, grads = output_and_grads(ms_deform_attn, inputs, go.contiguous())
    out_nc, grads_nc = output_and_grads(ms_deform_attn, strided, go)
    assert_close_scaled(out_nc, out, 1e-6, "output")
    for g_nc, g in zip(grads_nc, grads, strict=True):
        assert_close_scaled(g_nc, g, RTOL[dtype] if dtype != torch.float32 else 1e-5, "gradient")


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=str)
def test_misaligned_value(dtype):
    # A contiguous value whose storage starts one element past a 16-byte boundary: no vector loads possible.
    value, spatial_shapes, level_start_index, loc, weights = sample_inputs(channels=32, dtype=dtype, device="cuda")
    storage = torch.empty(value.numel() + 1, dtype=dtype, device="cuda")
    shifted = storage[1:].view(value.shape).copy_(value)
    assert shifted.data_ptr() % 16 != 0
    _check((shifted, spatial_shapes, level_start_index, loc, weights), RTOL[dtype])


@pytest.mark.parametrize(("batch", "queries"), [(0, 3), (2, 0)])
def test_empty_inputs(batch, queries):
    inputs = sample_inputs(batch=batch, queries=queries, channels=32, dtype=torch.float32, device="cuda")
    out, (grad_value, grad_locations, grad_weights) = output_and_grads(ms_deform_attn, inputs)
    assert out.shape == (batch, queries, 64) and out.is_cuda
    assert grad_value.shape == inputs[0].shape and not grad_value.any()
    assert grad_locations.shape == inputs[3].shape and grad_weights.shape == inputs[4].shape


def test_nonfinite_locations_match_the_cpu_kernel():
    inputs = sample_inputs(batch=2, queries=4, channels=32, dtype=torch.float32, locations="inside")
    value, spatial_shapes, level_start_index, loc, weights = inputs
    loc = loc.clone()
    for i, v in enumerate([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9]):
        loc[i % 2, i % 4, i % 2, i % 3, i % 2, i % 2] = v
    inputs = (value, spatial_shapes, level_start_index, loc, weights)
    cpu = output_and_grads(ms_deform_attn, inputs)
    cuda = output_and_grads(ms_deform_attn, tuple(t.cuda() for t in inputs))  # the same grad_output
    assert cuda[0].isfinite().all() and all(g.isfinite().all() for g in cuda[1])
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    for g_cuda, g_cpu in zip(cuda[1], cpu[1], strict=True):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-5, atol=1e-5)


def test_runs_on_the_current_stream():
    inputs = sample_inputs(batch=2, queries=50, channels=32, dtype=torch.float32, device="cuda")
    expected = ms_deform_attn(*inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ms_deform_attn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_level_tensors_on_the_cpu_are_rejected():
    value, spatial_shapes, level_start_index, loc, weights = sample_inputs(device="cuda")
    with pytest.raises(RuntimeError, match="spatial_shapes is on cpu but value is on cuda"):
        ms_deform_attn(value, spatial_shapes.cpu(), level_start_index, loc, weights)
    with pytest.raises(ValueError, match="inputs are on different devices"):
        ms_deform_attn(value, spatial_shapes, level_start_index, loc.cpu(), weights)


def test_deterministic_algorithms_make_backward_raise():
    inputs = sample_inputs(device="cuda", requires_grad=True)
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        out = ms_deform_attn(*inputs)  # the forward is deterministic and allowed
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            out.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="ms_deform_attn_backward_cuda"):
            ms_deform_attn(*inputs).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def test_module_under_bfloat16_autocast():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=64, n_levels=2, n_heads=2, n_points=4).cuda()
    spatial_shapes = torch.tensor([[6, 8], [3, 4]], device="cuda")
    level_start_index = torch.tensor([0, 48], device="cuda")
    query, x = torch.randn(2, 10, 64, device="cuda"), torch.randn(2, 60, 64, device="cuda")
    reference_points = torch.rand(2, 10, 2, 2, device="cuda")
    expected = module(query, reference_points, x, spatial_shapes, level_start_index)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(query, reference_points, x, spatial_shapes, level_start_index)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in module.parameters())
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2 * expected.abs().max().item())
