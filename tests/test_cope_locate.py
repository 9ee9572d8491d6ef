"""``deformable.cope_locate``: the mapping's contract on one line tensor (``cope_locate_lines``), and the fused op
(every level and axis at once) against its PyTorch reference: values, gradients, layouts, errors."""

from __future__ import annotations

import pytest
import torch

from deformable import native_available
from deformable.cope_locate import cope_locate, cope_locate_lines, cope_locate_pytorch
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
    torch.testing.assert_close(cope_locate_lines(edges, index, ref, offsets, mix), expected, rtol=0, atol=1e-12)


def test_lands_on_the_target_count_and_is_monotone() -> None:
    edges, _, _, _, _ = sample_inputs(lines=1, width=12, seed=1)
    ref = torch.full((1,), 3.3, dtype=torch.float64)
    offsets = torch.linspace(-6, edges[0, -1].item() + 3, 500, dtype=torch.float64)[None]
    one = torch.ones(1, 1, dtype=torch.float64)
    x = cope_locate_lines(edges, torch.zeros(1, 1, dtype=torch.long), ref, offsets, one)
    assert (x.diff(dim=-1) >= 0).all()
    torch.testing.assert_close(count_at(edges[0], x[0]), count_at(edges[0], ref) + offsets[0], rtol=0, atol=1e-9)


def test_flat_runs_are_jumped_to_their_end() -> None:
    edges = cumulative_counts(torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64))
    ref, offsets = torch.tensor([0.5]).double(), torch.tensor([[0.25, 1.0, 1.5]]).double()
    got = cope_locate_lines(edges, torch.zeros(1, 1, dtype=torch.long), ref, offsets, torch.ones(1, 1).double())
    torch.testing.assert_close(got, torch.tensor([[0.75, 4.5, 5.0]]).double())  # 1 count on: the second thing


def test_mix_is_a_weighted_sum_of_the_channels() -> None:
    edges, index, ref, offsets, mix = sample_inputs()
    one = torch.ones_like(mix[:, :1])
    per_channel = [cope_locate_lines(edges, index[:, r : r + 1], ref, offsets, one) for r in (0, 1)]
    expected = mix[:, :1] * per_channel[0] + mix[:, 1:] * per_channel[1]
    torch.testing.assert_close(cope_locate_lines(edges, index, ref, offsets, mix), expected)


SHAPES = ((4, 6), (2, 3))  # (H, W) per level


def map_inputs(
    batch: int = 2,
    queries: int = 5,
    heads: int = 3,
    shapes: tuple[tuple[int, int], ...] = SHAPES,
    points: int = 3,
    channels: int = 2,
    ref_dim: int = 2,
    seed: int = 0,
    closed: float = 0.5,
    dtype: torch.dtype = torch.float64,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the fused op: line tensors with flat runs, references also off the map (and boxes)."""
    gen = torch.Generator().manual_seed(seed)
    edges = []
    for h, w in shapes:
        for lines, size in ((h, w), (w, h)):
            density = torch.rand(batch * lines * heads * channels, size, generator=gen, dtype=torch.float64) * 2
            density[density < closed] = 0.0
            edges.append(cumulative_counts(density).to(dtype))
    ref = torch.rand(batch, queries, len(shapes), ref_dim, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:].abs() * 0.5 + 0.05
    offsets = torch.randn(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=torch.float64) * 3
    mix = torch.softmax(torch.randn(batch, queries, heads, 2, channels, generator=gen, dtype=torch.float64), -1)
    return edges, ref.to(dtype), offsets.to(dtype), mix.to(dtype)


def test_fused_reference_is_the_line_math_per_level_and_axis() -> None:
    """The fused reference reads, for x, the row through the reference and, for y, its column, per head and channel,
    and divides by the line's length: checked against cope_locate_lines called by hand for one query."""
    edges, ref, offsets, mix = map_inputs(ref_dim=4)
    got = cope_locate_pytorch(edges, ref, offsets, mix)
    n, q, heads, channels, points = 1, 3, 3, 2, 3
    for lvl, (h, w) in enumerate(SHAPES):
        for axis, (size, n_lines) in enumerate(((w, h), (h, w))):
            across = min(max(int(float(ref[n, q, lvl, 1 - axis]) * n_lines // 1), 0), n_lines - 1)
            for m in range(heads):
                first = ((n * n_lines + across) * heads + m) * channels
                lines = torch.arange(first, first + channels)[None]
                u = offsets[n, q, m, lvl, :, axis] * ref[n, q, lvl, 2 + axis] * size / (2 * points)
                e = (ref[n, q, lvl, axis] * size)[None]
                x = cope_locate_lines(edges[2 * lvl + axis], lines, e, u[None], mix[n, q, m, axis][None])[0]
                torch.testing.assert_close(got[n, q, m, lvl, :, axis], x / size)


def test_every_density_one_is_the_plain_module() -> None:
    """All-open lines: the locations are the plain module's, ref + offset / size (boxes: ref + u * wh / (2P))."""
    for ref_dim in (2, 4):
        _, ref, offsets, mix = map_inputs(ref_dim=ref_dim)
        edges = []
        for h, w in SHAPES:
            for lines, size in ((h, w), (w, h)):
                edges.append(torch.arange(size + 1, dtype=torch.float64).expand(2 * lines * 3 * 2, -1).contiguous())
        sizes = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)  # (L, 2) as (x, y)
        if ref_dim == 2:
            expected = ref[:, :, None, :, None, :] + offsets / sizes[:, None, :]
        else:
            expected = ref[:, :, None, :, None, :2] + offsets * ref[:, :, None, :, None, 2:] / (2 * offsets.shape[4])
        torch.testing.assert_close(cope_locate(edges, ref, offsets, mix), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(cope_locate_pytorch(edges, ref, offsets, mix), expected, rtol=0, atol=1e-12)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_native_matches_the_reference(dtype: torch.dtype, ref_dim: int) -> None:
    edges, ref, offsets, mix = map_inputs(ref_dim=ref_dim, seed=2, dtype=dtype)
    tensors = [t.clone().requires_grad_() for t in (*edges, ref, offsets, mix)]
    native = torch.ops.deformable.cope_locate(tensors[:-3], *tensors[-3:])
    reference = cope_locate_pytorch(tensors[:-3], *tensors[-3:])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(native, reference, **tol)
    weight = torch.randn(native.shape, dtype=dtype)
    grads_native = torch.autograd.grad((native * weight).sum(), tensors)
    grads_reference = torch.autograd.grad((reference * weight).sum(), tensors)
    for a, b in zip(grads_native, grads_reference, strict=True):
        torch.testing.assert_close(a, b, **tol)


@needs_native
@pytest.mark.parametrize("scratch_mib", ["64", "0"])
def test_threaded_backward_matches_the_reference(monkeypatch, scratch_mib: str) -> None:
    """Enough queries for several CPU tasks, with the threads' private copies of the lines' gradient (the default)
    and with shared compare-and-swap adds (``DEFORMABLE_COPE_SCRATCH_MIB=0``)."""
    monkeypatch.setenv("DEFORMABLE_COPE_SCRATCH_MIB", scratch_mib)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        edges, ref, offsets, mix = map_inputs(batch=2, queries=300, shapes=((6, 9), (3, 5)), seed=5)
        tensors = [t.clone().requires_grad_() for t in (*edges, ref, offsets, mix)]
        weight = torch.randn(offsets.shape, dtype=torch.float64)
        native = (torch.ops.deformable.cope_locate(tensors[:-3], *tensors[-3:]) * weight).sum()
        reference = (cope_locate_pytorch(tensors[:-3], *tensors[-3:]) * weight).sum()
        for a, b in zip(torch.autograd.grad(native, tensors), torch.autograd.grad(reference, tensors), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_scratch_setting_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("DEFORMABLE_COPE_SCRATCH_MIB", "lots")
    edges, ref, offsets, mix = map_inputs()
    out = torch.ops.deformable.cope_locate(edges, ref, offsets.requires_grad_(), mix)
    message = "DEFORMABLE_COPE_SCRATCH_MIB must be a whole number of MiB >= 0, got 'lots'"
    with pytest.raises(RuntimeError, match=message):
        out.sum().backward()


@pytest.mark.parametrize("path", ["native", "pytorch"])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_gradcheck(path: str, ref_dim: int) -> None:
    if path == "native" and not native_available():
        pytest.skip("the native extension is not built")
    # no flat runs (the mapping is smooth there); few queries, float64
    edges, ref, offsets, mix = map_inputs(batch=1, queries=3, heads=2, closed=0.0, ref_dim=ref_dim)
    fn = torch.ops.deformable.cope_locate if path == "native" else cope_locate_pytorch
    inputs = tuple(t.clone().requires_grad_() for t in (*edges, ref, offsets, mix))
    assert torch.autograd.gradcheck(lambda *x: fn(list(x[:-3]), *x[-3:]), inputs)


@needs_native
def test_opcheck() -> None:
    edges, ref, offsets, mix = map_inputs(closed=0.0)
    args = ([e.requires_grad_() for e in edges], ref.requires_grad_(), offsets.requires_grad_(), mix.requires_grad_())
    torch.library.opcheck(torch.ops.deformable.cope_locate.default, args)


def test_non_contiguous_and_empty_inputs() -> None:
    edges, ref, offsets, mix = map_inputs()
    expected = cope_locate_pytorch(edges, ref, offsets, mix)
    wide = torch.randn(*offsets.shape, 2, dtype=torch.float64)
    wide[..., 0] = offsets
    wide_edges = [torch.stack([e, e], -1)[..., 1] for e in edges]
    torch.testing.assert_close(cope_locate(wide_edges, ref, wide[..., 0], mix), expected)
    empty = cope_locate(edges, ref, offsets[:, :, :, :, :0], mix)
    assert empty.shape == offsets[:, :, :, :, :0].shape
    if native_available():
        no_points = offsets[:, :, :, :, :0].requires_grad_()
        out = torch.ops.deformable.cope_locate(edges, ref, no_points, mix.requires_grad_())
        assert (torch.autograd.grad(out.sum(), mix)[0] == 0).all()


def _bad(**change):
    names = ("edges", "ref", "offsets", "mix")
    args = dict(zip(names, map_inputs(), strict=True))
    return [change[n](args[n]) if n in change else args[n] for n in names]


@needs_native
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_bad(offsets=lambda t: t[..., 0]), r"offsets must have shape \(N, Lq, M, L, P, 2\)"),
        (_bad(ref=lambda t: t[:, :3]), r"reference points must have shape \(N, Lq, L, 2\|4\) = \(2, 5, 2, 2\|4\)"),
        (_bad(ref=lambda t: t[..., :1]), r"reference points must have shape"),
        (_bad(mix=lambda t: t[:, :, :2]), r"mix must have shape \(N, Lq, M, 2, R\) = \(2, 5, 3, 2, R\)"),
        (_bad(edges=lambda e: e[:3]), r"edges must hold 2 \* L = 4 line tensors"),
        (
            _bad(edges=lambda e: [e[0][:-1], *e[1:]]),
            r"edges\[0\] \(level 0, x\) must have N \* H \* M \* R = 2 \* 4 \* 3 \* 2 = 48 lines, got 47",
        ),
        (_bad(edges=lambda e: [e[0][:, :1], *e[1:]]), r"edges\[0\] must have shape \(lines, S \+ 1\) with S >= 1"),
        (_bad(edges=lambda e: [e[0].float(), *e[1:]]), r"edges\[0\] must have the dtype of offsets"),
        (_bad(mix=lambda t: t.float()), "mix must have the dtype of offsets"),
        (_bad(offsets=lambda t: t.half()), "offsets must be float32 or float64"),
    ],
)
def test_native_errors_name_the_problem(args, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        torch.ops.deformable.cope_locate(*args)


def test_export_search_finds_the_same_segments() -> None:
    """The comparison count used when exporting (ONNX has no sorted search) agrees with the sorted search."""
    from deformable.cope_locate import _search, _segments

    edges, index, ref, offsets, _ = sample_inputs(seed=3)
    t = ref[:, None, None] + offsets[:, None, :] * torch.tensor([1.0, 2.0], dtype=torch.float64)[None, :, None]
    torch.testing.assert_close(_segments(edges, index, t), _search(edges, index, t))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_cuda_matches_the_cpu_reference(dtype: torch.dtype, ref_dim: int) -> None:
    shapes = ((20, 40), (10, 20))
    edges, ref, offsets, mix = map_inputs(queries=300, shapes=shapes, ref_dim=ref_dim, seed=4, dtype=dtype)
    cpu = [t.clone().requires_grad_() for t in (*edges, ref, offsets, mix)]
    gpu = [t.cuda().requires_grad_() for t in (*edges, ref, offsets, mix)]
    expected, got = cope_locate_pytorch(cpu[:-3], *cpu[-3:]), cope_locate(gpu[:-3], *gpu[-3:])
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(got.cpu(), expected, **tol)
    weight = torch.randn(expected.shape, dtype=dtype)
    grads_cpu = torch.autograd.grad((expected * weight).sum(), cpu)
    grads_gpu = torch.autograd.grad((got * weight.cuda()).sum(), gpu)
    for a, b in zip(grads_gpu, grads_cpu, strict=True):
        torch.testing.assert_close(a.cpu(), b, **tol)
