"""``deformable.cope_locate``: the native op against its PyTorch reference, gradients, and the mapping's contract."""

from __future__ import annotations

import pytest
import torch

from deformable import native_available
from deformable.cope_locate import cope_locate, cope_locate_pytorch
from deformable.cope_sampling import cumulative_counts

needs_native = pytest.mark.skipif(not native_available(), reason="the native extension is not built")


def sample_inputs(
    lines: int = 5, width: int = 9, rows: int = 40, channels: int = 2, points: int = 3, seed: int = 0, closed=0.5
) -> tuple[torch.Tensor, ...]:
    """Edges with flat runs (densities below ``closed`` set to 0), references also outside the line."""
    gen = torch.Generator().manual_seed(seed)
    density = torch.rand(lines, width, generator=gen, dtype=torch.float64) * 2
    density[density < closed] = 0.0
    edges = cumulative_counts(density)
    index = torch.randint(0, lines, (rows, channels), generator=gen)
    ref = torch.rand(rows, generator=gen, dtype=torch.float64) * (width + 4) - 2
    offsets = torch.randn(rows, points, generator=gen, dtype=torch.float64) * 4
    mix = torch.softmax(torch.randn(rows, channels, generator=gen, dtype=torch.float64), -1)
    return edges, index, ref, offsets, mix


def count_at(edges: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The cumulative count of one line ``(W + 1,)`` at edge coordinates ``x`` (slope 1 outside [0, W])."""
    width = edges.shape[0] - 1
    k = x.floor().clamp(0, width - 1).long()
    inside = edges[k] + (x - k) * (edges[k + 1] - edges[k])
    return torch.where(x < 0, x, torch.where(x > width, edges[-1] + x - width, inside))


def test_every_density_one_is_pixel_offsets() -> None:
    _, index, ref, offsets, mix = sample_inputs()
    edges = torch.arange(10, dtype=torch.float64).expand(5, -1).contiguous()
    expected = ref[:, None] + offsets  # references and landing points also outside [0, W]
    torch.testing.assert_close(cope_locate(edges, index, ref, offsets, mix), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(cope_locate_pytorch(edges, index, ref, offsets, mix), expected, rtol=0, atol=1e-12)


def test_lands_on_the_target_count_and_is_monotone() -> None:
    edges, _, _, _, _ = sample_inputs(lines=1, width=12, seed=1)
    ref = torch.full((1,), 3.3, dtype=torch.float64)
    offsets = torch.linspace(-6, edges[0, -1].item() + 3, 500, dtype=torch.float64)[None]
    one = torch.ones(1, 1, dtype=torch.float64)
    x = cope_locate(edges, torch.zeros(1, 1, dtype=torch.long), ref, offsets, one)
    assert (x.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(count_at(edges[0], x[0]), count_at(edges[0], ref) + offsets[0], rtol=0, atol=1e-9)


def test_flat_runs_are_jumped_to_their_end() -> None:
    edges = cumulative_counts(torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64))
    ref, offsets = torch.tensor([0.5]).double(), torch.tensor([[0.25, 1.0, 1.5]]).double()
    got = cope_locate(edges, torch.zeros(1, 1, dtype=torch.long), ref, offsets, torch.ones(1, 1).double())
    torch.testing.assert_close(got, torch.tensor([[0.75, 4.5, 5.0]]).double())  # 1 count on: the second thing


def test_mix_is_a_weighted_sum_of_the_channels() -> None:
    edges, index, ref, offsets, mix = sample_inputs()
    per_channel = [cope_locate(edges, index[:, r : r + 1], ref, offsets, torch.ones_like(mix[:, :1])) for r in (0, 1)]
    expected = mix[:, :1] * per_channel[0] + mix[:, 1:] * per_channel[1]
    torch.testing.assert_close(cope_locate(edges, index, ref, offsets, mix), expected)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_the_reference(dtype: torch.dtype) -> None:
    edges, index, ref, offsets, mix = (t.to(dtype) if t.is_floating_point() else t for t in sample_inputs(seed=2))
    tensors = [t.clone().requires_grad_() for t in (edges, ref, offsets, mix)]
    native = torch.ops.deformable.cope_locate(tensors[0], index, *tensors[1:])
    reference = cope_locate_pytorch(tensors[0], index, *tensors[1:])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(native, reference, **tol)
    weight = torch.randn(native.shape, dtype=dtype)
    grads_native = torch.autograd.grad((native * weight).sum(), tensors)
    grads_reference = torch.autograd.grad((reference * weight).sum(), tensors)
    for a, b in zip(grads_native, grads_reference, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("path", ["native", "pytorch"])
def test_gradcheck(path: str) -> None:
    if path == "native" and not native_available():
        pytest.skip("the native extension is not built")
    edges, index, ref, offsets, mix = sample_inputs(closed=0.0)  # no flat runs: the mapping is smooth there
    fn = torch.ops.deformable.cope_locate if path == "native" else cope_locate_pytorch
    inputs = tuple(t.clone().requires_grad_() for t in (edges, ref, offsets, mix))
    assert torch.autograd.gradcheck(lambda e, r, o, m: fn(e, index, r, o, m), inputs)


@needs_native
def test_opcheck() -> None:
    edges, index, ref, offsets, mix = sample_inputs(closed=0.0)
    args = (edges.requires_grad_(), index, ref.requires_grad_(), offsets.requires_grad_(), mix.requires_grad_())
    torch.library.opcheck(torch.ops.deformable.cope_locate.default, args)


def test_non_contiguous_and_empty_inputs() -> None:
    edges, index, ref, offsets, mix = sample_inputs()
    expected = cope_locate_pytorch(edges, index, ref, offsets, mix)
    wide = torch.randn(offsets.shape[0], offsets.shape[1], 2, dtype=torch.float64)
    wide[..., 0] = offsets
    torch.testing.assert_close(cope_locate(edges, index, ref, wide[..., 0], mix), expected)
    empty = cope_locate(edges, index[:0], ref[:0], offsets[:0], mix[:0])
    assert empty.shape == (0, offsets.shape[1])


@needs_native
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "edges": a["edges"][:, :1]}, r"edges must have shape \(Lines, W \+ 1\) with W >= 1"),
        (lambda a: {**a, "mix": a["mix"][:, :1]}, r"mix has shape \[40, 1\] but lines has \[40, 2\]"),
        (lambda a: {**a, "ref": a["ref"][:3]}, r"ref must have shape \(B,\) = \(40,\)"),
        (lambda a: {**a, "offsets": a["offsets"].float()}, "offsets must have the dtype of edges"),
        (lambda a: {**a, "lines": a["lines"].int()}, "lines must be int64"),
        (lambda a: {**a, "lines": a["lines"] + 5}, r"lines holds values in \[5, 9\], outside the 5 lines of edges"),
        (lambda a: {**a, "edges": a["edges"].half()}, "edges must be float32 or float64"),
    ],
)
def test_native_errors_name_the_problem(change, message: str) -> None:
    names = ("edges", "lines", "ref", "offsets", "mix")
    args = change(dict(zip(names, sample_inputs(), strict=True)))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deformable.cope_locate(*(args[n] for n in names))


def test_export_search_finds_the_same_segments() -> None:
    """The comparison count used when exporting (ONNX has no sorted search) agrees with the sorted search."""
    from deformable.cope_locate import _search, _segments

    edges, index, ref, offsets, _ = sample_inputs(seed=3)
    t = ref[:, None, None] + offsets[:, None, :] * torch.tensor([1.0, 2.0], dtype=torch.float64)[None, :, None]
    torch.testing.assert_close(_segments(edges, index, t), _search(edges, index, t))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_the_cpu_reference(dtype: torch.dtype) -> None:
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in sample_inputs(rows=300, width=40, seed=4)]
    cpu = [t.clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    gpu = [t.cuda().requires_grad_() if t.is_floating_point() else t.cuda() for t in inputs]
    expected, got = cope_locate_pytorch(*cpu), cope_locate(*gpu)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(got.cpu(), expected, **tol)
    weight = torch.randn(expected.shape, dtype=dtype)
    floating = [i for i, t in enumerate(cpu) if t.is_floating_point()]
    grads_cpu = torch.autograd.grad((expected * weight).sum(), [cpu[i] for i in floating])
    grads_gpu = torch.autograd.grad((got * weight.cuda()).sum(), [gpu[i] for i in floating])
    for a, b in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, **tol)
