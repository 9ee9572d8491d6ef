"""ms_deform_attn registration: float64 gradcheck of the native path, torch.library.opcheck, torch.compile, and
the dispatch between the native op and the PyTorch path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import torch
from _ops_utils import output_and_grads, random_grad, requires_native, sample_inputs

import deformable
from deformable import MSDeformAttn, _extension, ms_deform_attn, ms_deform_attn_pytorch, ops
from deformable.__main__ import diagnose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@requires_native
@pytest.mark.parametrize(
    ("channels", "shapes", "points", "locations"),
    [
        (3, ((3, 4), (1, 5), (4, 1)), 2, "border"),
        (2, ((2, 3), (3, 2)), 3, "inside"),
        (16, ((2, 2),), 1, "border"),  # a fixed-size channel loop
    ],
)
def test_gradcheck_native(channels, shapes, points, locations):
    value, spatial_shapes, level_start_index, loc, weights = sample_inputs(
        batch=2, queries=2, heads=2, channels=channels, shapes=shapes, points=points, locations=locations,
        kink_margin=1e-3, requires_grad=True,
    )  # fmt: skip

    def fn(v, locs, w):
        return ms_deform_attn(v, spatial_shapes, level_start_index, locs, w)

    assert torch.autograd.gradcheck(fn, (value, loc, weights))


OPCHECK_SAMPLES = {
    "float64": {"dtype": torch.float64},
    "float64-grad": {"dtype": torch.float64, "requires_grad": True},
    "float32-grad-inside": {"dtype": torch.float32, "requires_grad": True, "locations": "inside"},
    "bfloat16-grad": {"dtype": torch.bfloat16, "requires_grad": True},
    "empty-batch-grad": {"batch": 0, "requires_grad": True},
}


@requires_native
@pytest.mark.parametrize("options", OPCHECK_SAMPLES.values(), ids=OPCHECK_SAMPLES.keys())
def test_opcheck(options):
    args = list(sample_inputs(**options))
    torch.library.opcheck(torch.ops.deformable.ms_deform_attn.default, args)


@requires_native
def test_opcheck_value_grad_only():
    value, spatial_shapes, level_start_index, loc, weights = sample_inputs(dtype=torch.float32)
    args = [value.requires_grad_(), spatial_shapes, level_start_index, loc, weights]
    torch.library.opcheck(torch.ops.deformable.ms_deform_attn.default, args)


@requires_native
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        torch.float32,
        torch.bfloat16,
    ],
    ids=str,
)
def test_opcheck_backward_op(dtype):
    # The backward op has its own fake kernel; under torch.compile its outputs must match it in shape, dtype and
    # strides (inductor asserts them).
    inputs = sample_inputs(dtype=dtype)
    grad_output = random_grad(torch.empty(2, 3, 8, dtype=dtype))
    torch.library.opcheck(torch.ops.deformable.ms_deform_attn_backward.default, [grad_output, *inputs])


@requires_native
def test_a_second_derivative_is_refused_on_the_native_path_and_computed_on_the_pytorch_one():
    """The kernels have first derivatives only: a gradient penalty through the native op must fail, not give zeros."""
    value, shapes, starts, locations, weights = sample_inputs(dtype=torch.float64)
    locations = locations.clone().requires_grad_()

    def penalty() -> torch.Tensor:
        out = ms_deform_attn(value, shapes, starts, locations, weights)
        (grad,) = torch.autograd.grad(out.square().sum(), locations, create_graph=True)
        return grad.square().sum()

    with pytest.raises(RuntimeError, match=r"no second derivative .*deformable.backend\('pytorch'\)"):
        penalty().backward()
    locations.grad = None
    with deformable.backend("pytorch"):
        penalty().backward()
    assert locations.grad.abs().sum() > 0


def _compare_compiled(fn, inputs, backend: str) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    out, grads = output_and_grads(compiled, inputs)
    ref, ref_grads = output_and_grads(fn, inputs)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@requires_native
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_op_matches_eager(backend):
    # The registered op itself (fake kernels + autograd), fullgraph; inductor also checks the real outputs' strides.
    inputs = sample_inputs(dtype=torch.float32)
    _compare_compiled(torch.ops.deformable.ms_deform_attn, inputs, backend)


@requires_native
def test_compiled_function_matches_eager():
    _compare_compiled(ms_deform_attn, sample_inputs(dtype=torch.float32), "aot_eager")


@requires_native
def test_compiled_module_matches_eager():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=2)
    value, spatial_shapes, level_start_index, _, _ = sample_inputs()
    query = torch.randn(2, 5, 8, requires_grad=True)
    inputs = torch.randn(2, value.shape[1], 8)
    reference_points = torch.rand(2, 5, 3, 2)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    outputs = []
    for fn in (compiled, module):
        module.zero_grad()
        query.grad = None
        out = fn(query, reference_points, inputs, spatial_shapes, level_start_index)
        out.square().sum().backward()
        outputs.append((out, query.grad.clone(), [p.grad.clone() for p in module.parameters()]))
    (out, grad_query, grads), (ref, ref_query, ref_grads) = outputs
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad_query, ref_query)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@requires_native
def test_native_path_is_the_default():
    assert _extension.extension_loaded(), _extension.LOAD_ERROR
    assert deformable.native_available()
    assert _extension.native_supports("cpu")
    assert "cpu" in _extension.build_info().split(";")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_is_built():
    # A GPU is visible: the CUDA tests need the extension's CUDA kernels, a CPU-only build is a broken install here.
    assert _extension.extension_loaded(), _extension.LOAD_ERROR
    assert _extension.native_supports("cuda"), f"deformable._C was built for {_extension.build_info()!r} only"


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


@requires_native
@pytest.mark.parametrize("setting", ["pytorch", " PyTorch "])
def test_backend_variable_forces_the_pytorch_path(monkeypatch, setting):
    inputs = sample_inputs()
    reference, native_op = _Spy(ms_deform_attn_pytorch), _Spy(torch.ops.deformable.ms_deform_attn)
    monkeypatch.setattr(ops, "ms_deform_attn_pytorch", reference)
    monkeypatch.setattr(torch.ops.deformable, "ms_deform_attn", native_op)
    monkeypatch.setenv("DEFORMABLE_BACKEND", setting)
    assert not deformable.native_available()
    out = ms_deform_attn(*inputs)
    assert (reference.calls, native_op.calls) == (1, 0)
    assert torch.equal(out, ms_deform_attn_pytorch(*inputs))


@requires_native
def test_native_path_does_not_call_the_reference(monkeypatch):
    inputs = sample_inputs()
    reference, native_op = _Spy(ms_deform_attn_pytorch), _Spy(torch.ops.deformable.ms_deform_attn)
    monkeypatch.setattr(ops, "ms_deform_attn_pytorch", reference)
    monkeypatch.setattr(torch.ops.deformable, "ms_deform_attn", native_op)
    out = ms_deform_attn(*inputs)
    assert (reference.calls, native_op.calls) == (0, 1)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: no _C here")
    monkeypatch.setattr(ops, "_warned", set())
    inputs = sample_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert re.search(r"native extension is not available \(ImportError: no _C here\).*PyTorch path", messages[0])
    assert "python -m deformable" in messages[0]
    assert torch.equal(out, ms_deform_attn_pytorch(*inputs))


@requires_native
def test_a_device_without_kernels_says_whether_a_build_would_add_them(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(_extension, "NATIVE_DEVICES", frozenset({"cuda"}))  # a build without CPU kernels
    apple = types.SimpleNamespace(device=types.SimpleNamespace(type="mps"))  # use_native reads the device only
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ops.use_native(sample_inputs()[0]) and not ops.use_native(apple)
    cpu, mps = (str(w.message) for w in caught)
    assert "built without cpu kernels" in cpu and "To get them, build it with" in cpu
    assert "kernels for the CPU and CUDA only, not mps; using the PyTorch path on mps." in mps and "build" not in mps
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(_extension, "LOAD_ERROR", "ImportError: no _C here")  # not built at all: still no advice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ops.use_native(apple)
    assert "not available (ImportError: no _C here); using the slower PyTorch path." in str(caught[0].message)
    assert "build" not in str(caught[0].message)


@requires_native
def test_diagnosis_command():
    env = {k: v for k, v in os.environ.items() if k != "DEFORMABLE_BACKEND"}
    result = subprocess.run(
        [sys.executable, "-m", "deformable"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "native op: loaded" in result.stdout
    assert "cpu kernel: yes" in result.stdout
    assert "backend in use: native" in result.stdout


def test_diagnosis_reports_the_forced_backend(monkeypatch):
    monkeypatch.setenv("DEFORMABLE_BACKEND", "pytorch")
    text = diagnose()
    assert "DEFORMABLE_BACKEND=pytorch: the PyTorch path is forced" in text
    assert "backend in use: pytorch" in text


def test_diagnosis_reports_the_instruction_set_cap(monkeypatch):
    monkeypatch.setenv("DEFORMABLE_CPU_ISA", "avx2")
    assert "DEFORMABLE_CPU_ISA=avx2: caps the deformable CPU kernels' instruction set at avx2" in diagnose()
    monkeypatch.delenv("DEFORMABLE_CPU_ISA")
    assert "DEFORMABLE_CPU_ISA" not in diagnose()
    for bad in ("bogus", "AVX2"):
        monkeypatch.setenv("DEFORMABLE_CPU_ISA", bad)
        assert f"DEFORMABLE_CPU_ISA={bad}: INVALID, every CPU op call will fail: use one of base, avx2" in diagnose()


@requires_native
def test_meta_tensors_get_shapes_from_the_fake_kernels_without_a_warning():
    inputs = [x.to("meta") for x in sample_inputs()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs)
        attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=2, n_points=2).to("meta")
        shapes = torch.tensor([[4, 4], [2, 2]], device="meta")
        args = (torch.empty(1, 5, 32, device="meta"), torch.empty(1, 5, 2, 2, device="meta"))
        module_out = attn(*args, torch.empty(1, 20, 32, device="meta"), shapes, torch.tensor([0, 16], device="meta"))
    assert out.device.type == "meta" and out.shape == (inputs[0].shape[0], inputs[3].shape[1], 2 * 4)
    assert module_out.shape == (1, 5, 32)
