"""``MSDeformAttn(offset_mode="cope")``: the contextual offset mapping, its special cases and the module contract."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from _repo import load_tool
from torch import nn
from torch.nn import functional as F

from deformable import MSDeformAttn, ms_deform_attn_pytorch
from deformable.cope_sampling import CoPESampling

SHAPES = ((4, 6), (2, 3))  # (H, W) per level
D_MODEL, N_HEADS, N_POINTS = 16, 2, 3


def level_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    shapes = torch.tensor(SHAPES)
    sizes = shapes.prod(1)
    return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def sample_inputs(len_q: int = 5, ref_dim: int = 2, seed: int = 0, dtype=torch.float64) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, len_q, D_MODEL, generator=gen, dtype=dtype)
    value = torch.randn(2, s, D_MODEL, generator=gen, dtype=dtype)
    ref = torch.rand(2, len_q, len(SHAPES), ref_dim, generator=gen, dtype=dtype) * 0.8 + 0.1
    return query, ref, value


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero gate queries and offsets, so that gates differ and points spread."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("cope.") or name.startswith("sampling_offsets"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


class OriginalMSDeformAttn(nn.Module):
    """The original module, written out: the oracle for ``offset_mode="linear"``."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
        for i in range(n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias = nn.Parameter(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, ref, input_flatten, shapes, starts, padding_mask=None):
        n, len_q, _ = query.shape
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, input_flatten.shape[1], self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(n, len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, len_q, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, len_q, self.n_heads, self.n_levels, self.n_points)
        if ref.shape[-1] == 2:
            normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
            loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        else:
            loc = ref[:, :, None, :, None, :2] + offsets / self.n_points * ref[:, :, None, :, None, 2:] * 0.5
        return self.output_proj(ms_deform_attn_pytorch(value, shapes, starts, loc, weights))


# The module ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_fresh_cope_module_is_the_plain_module(ref_dim: int) -> None:
    torch.manual_seed(0)
    linear = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS).double()
    torch.manual_seed(0)
    cope = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="cope").double()
    with torch.no_grad():  # non-trivial offsets; the gate query stays zero, so every density is 1
        w = torch.randn_like(linear.sampling_offsets.weight)
        linear.sampling_offsets.weight.copy_(w)
        cope.sampling_offsets.weight.copy_(w)
    query, ref, value = sample_inputs(ref_dim=ref_dim)
    shapes, starts = level_tensors()
    torch.testing.assert_close(cope(query, ref, value, shapes, starts), linear(query, ref, value, shapes, starts))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_linear_mode_is_the_original(ref_dim: int) -> None:
    torch.manual_seed(3)
    original = OriginalMSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS).double()
    torch.manual_seed(3)
    module = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="linear").double()
    assert {k: v.shape for k, v in module.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()
    }
    for key, tensor in original.state_dict().items():
        assert torch.equal(module.state_dict()[key], tensor), key
    randomise(original)
    module.load_state_dict(original.state_dict())
    query, ref, value = sample_inputs(ref_dim=ref_dim)
    shapes, starts = level_tensors()
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[1, -5:] = True
    torch.testing.assert_close(
        module(query, ref, value, shapes, starts, mask), original(query, ref, value, shapes, starts, mask)
    )


def test_cope_adds_only_its_gate_parameters() -> None:
    linear = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS)
    cope = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="cope", cope_gate_dim=4, cope_channels=3)
    extra = {k: tuple(v.shape) for k, v in cope.state_dict().items() if k not in linear.state_dict()}
    assert extra == {
        "cope.gate_key.weight": (4, D_MODEL),
        "cope.gate_key.bias": (4,),
        "cope.gate_query": (N_HEADS, 3, 4),
        "cope.gate_bias": (N_HEADS, len(SHAPES), 3),
        "cope.channel_mix.weight": (N_HEADS * 2 * 3, D_MODEL),
        "cope.channel_mix.bias": (N_HEADS * 2 * 3,),
    }


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_all_open_gates_are_the_plain_module(ref_dim: int) -> None:
    """Gates saturated open, with the count unit set to an open gate: every density is 1, as in the plain module."""
    torch.manual_seed(0)
    linear = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS).double()
    cope = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="cope").double()
    cope.cope = CoPESampling(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, gate_bias_init=40.0).double()
    cope.load_state_dict(randomise(linear).state_dict(), strict=False)
    with torch.no_grad():  # content-dependent logits, all far above 0: every gate is 1 to double precision
        cope.cope.gate_query.normal_(std=0.05)
        cope.cope.channel_mix.weight.normal_()
    query, ref, value = sample_inputs(ref_dim=ref_dim)
    shapes, starts = level_tensors()
    torch.testing.assert_close(
        cope(query, ref, value, shapes, starts), linear(query, ref, value, shapes, starts), rtol=0, atol=1e-6
    )


def test_locations_are_monotone_in_the_offsets() -> None:
    module = randomise(MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="cope").double())
    query, ref, value = sample_inputs(len_q=3)
    shapes, _ = level_tensors()
    sweep = torch.linspace(-8, 8, 41, dtype=torch.float64)
    offsets = torch.zeros(2, 3, N_HEADS, len(SHAPES), 41, 2, dtype=torch.float64)
    offsets[..., 0] = sweep
    offsets[..., 1] = -sweep
    locations = module.cope(query, ref, offsets, value, shapes)  # (N, Lq, M, L, 41, 2)
    assert (locations[..., 0].diff(dim=-1) > 0).all()  # x grows with u_x (strictly: no gate is exactly closed)
    assert (locations[..., 1].diff(dim=-1) < 0).all()  # y falls as u_y falls


def test_padded_keys_count_as_the_outside_of_the_map() -> None:
    """A padded key counts one per pixel, whatever its content: as the map's outside does, and as every key of a
    fresh module does."""
    module = randomise(MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="cope").double())
    query, ref, value = sample_inputs()
    shapes, _ = level_tensors()
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask.view(2, -1)[:, : 4 * 6].view(2, 4, 6)[:, :, 4:] = True  # level 0: the two right columns are padding
    mask[:, 24:].view(2, 2, 3)[:, 1, :] = True  # level 1: the bottom row
    ref[..., 0] *= 0.6  # references inside the valid part
    ref[:, :, 1, 1] *= 0.5
    offsets = module.sampling_offsets(query).view(2, 5, N_HEADS, len(SHAPES), N_POINTS, 2)
    locations = module.cope(query, ref, offsets, value, shapes, mask)
    changed = value.clone()
    changed[mask] = torch.randn_like(changed[mask]) * 10  # the padded keys' content cannot matter
    torch.testing.assert_close(module.cope(query, ref, offsets, changed, shapes, mask), locations)
    density = module.cope.densities(value, [(4, 6), (2, 3)], mask, torch.float64)
    assert (density[0][:, :, 4:] == 1).all() and (density[0][:, :, :4] != 1).all()
    assert (density[1][:, 1] == 1).all() and (density[1][:, 0] != 1).all()


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("offset_mode", ["linear", "cope"])
def test_an_image_gives_the_same_output_alone_and_padded_in_a_batch(offset_mode: str, ref_dim: int) -> None:
    """Padding to a batch's larger map changes nothing for an image: its queries sample the same pixels (what lies
    beyond its edge is zero either way) with the same weights."""
    module = randomise(MSDeformAttn(D_MODEL, 2, N_HEADS, N_POINTS, offset_mode=offset_mode).double(), seed=2)
    gen = torch.Generator().manual_seed(3)
    small, big = ((3, 5), (2, 3)), ((5, 8), (3, 4))  # (H, W) per level: the image alone / padded in the batch
    maps = [torch.randn(h * w, D_MODEL, generator=gen, dtype=torch.float64) for h, w in small]
    query = torch.randn(1, 4, D_MODEL, generator=gen, dtype=torch.float64)
    extent = torch.tensor([[w, h] for h, w in small], dtype=torch.float64)  # (L, 2) as (W, H)
    pixels = torch.rand(1, 4, 2, 2, generator=gen, dtype=torch.float64) * extent  # each level's reference pixel
    boxes = (torch.rand(1, 4, 2, 2, generator=gen, dtype=torch.float64) + 0.5) * extent / 3  # box sides in pixels

    def run(shapes: tuple) -> torch.Tensor:
        padded, mask = [], []
        for (h, w), (hs, ws), level in zip(shapes, small, maps, strict=True):
            canvas = torch.zeros(h, w, D_MODEL, dtype=torch.float64)
            canvas[:hs, :ws] = level.view(hs, ws, D_MODEL)
            outside = torch.ones(h, w, dtype=torch.bool)
            outside[:hs, :ws] = False
            padded.append(canvas.flatten(0, 1))
            mask.append(outside.flatten())
        sizes = torch.tensor(shapes)
        starts = torch.cat([sizes.new_zeros(1), sizes.prod(1).cumsum(0)[:-1]])
        size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)  # this map's (W, H) per level
        ref = pixels / size if ref_dim == 2 else torch.cat([pixels / size, boxes / size], -1)
        return module(query, ref, torch.cat(padded)[None], sizes, starts, torch.cat(mask)[None])

    torch.testing.assert_close(run(big), run(small), rtol=0, atol=1e-10)


def test_gradcheck_reaches_gate_parameters_offsets_and_references() -> None:
    module = randomise(CoPESampling(6, 1, 1, 2, gate_dim=2, gate_temperature=1.0).double(), seed=4)
    gen = torch.Generator().manual_seed(5)
    shapes = torch.tensor([[3, 4]])
    query = torch.randn(1, 2, 6, generator=gen, dtype=torch.float64)
    value = torch.randn(1, 12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[[[0.3, 0.4, 0.5, 0.6]], [[0.7, 0.55, 0.3, 0.9]]]], dtype=torch.float64, requires_grad=True)
    offsets = torch.randn(1, 2, 1, 1, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    params = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    names = list(params)

    def fn(value, ref, offsets, *tensors):
        return torch.func.functional_call(
            module, dict(zip(names, tensors, strict=True)), (query, ref, offsets, value, shapes)
        )

    assert torch.autograd.gradcheck(fn, (value, ref, offsets, *params.values()))


def test_gradients_reach_the_gates_of_a_fresh_module() -> None:
    module = MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="cope").double()
    query, ref, value = sample_inputs()
    module(query, ref, value, *level_tensors()).square().sum().backward()
    assert module.cope.gate_query.grad.abs().sum() > 0  # what the channels look for: learns from the first step
    assert module.cope.gate_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_detector_call_patterns(ref_dim: int) -> None:
    """Encoder: Lq = S queries, a 2-d reference per level; decoder: boxes; both with a padding mask."""
    module = randomise(MSDeformAttn(D_MODEL, len(SHAPES), N_HEADS, N_POINTS, offset_mode="cope"))
    s = sum(h * w for h, w in SHAPES)
    len_q = s if ref_dim == 2 else 7
    query, ref, value = sample_inputs(len_q=len_q, ref_dim=ref_dim, dtype=torch.float32)
    mask = torch.zeros(2, s, dtype=torch.bool)
    mask[1, -3:] = True
    out = module(query, ref, value, *level_tensors(), mask)
    assert out.shape == (2, len_q, D_MODEL) and torch.isfinite(out).all()
    assert module(query[:0], ref[:0], value[:0], *level_tensors(), mask[:0]).shape == (0, len_q, D_MODEL)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MSDeformAttn(16, 1, 2, 2, offset_mode="foo"), r"offset_mode must be one of \('linear', 'cope'\)"),
        (lambda: MSDeformAttn(16, 1, 2, 2, offset_mode="cope", cope_gate_dim=0), "gate_dim must be >= 1"),
        (lambda: MSDeformAttn(16, 1, 2, 2, offset_mode="cope", cope_channels=0), "channels must be >= 1"),
        (lambda: CoPESampling(16, 1, 2, 2, gate_temperature=0.0), "gate_temperature must be > 0"),
        (lambda: CoPESampling(16, 1, 2, 2, gate_temperature=float("nan")), "gate_temperature must be a finite number"),
        (
            lambda: CoPESampling(16, 1, 2, 2, channels=2.0),
            r"CoPESampling: channels must be an integer, got 2.0 \(float\)",
        ),
        (lambda: CoPESampling(16, 1, 2, 2, channels=True), "channels must be an integer, got True"),
        (lambda: CoPESampling(16, 1, 2, 2, gate_dim="8"), "gate_dim must be an integer, got '8'"),
        (lambda: CoPESampling(16, 0, 2, 2), "CoPESampling: n_levels must be >= 1, got 0"),
        (lambda: CoPESampling(16, 1, 2, 2, gate_bias_init=float("inf")), "gate_bias_init must be a finite number"),
    ],
)
def test_bad_arguments(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_torch_compile(ref_dim: int) -> None:
    """Forward and backward through the fake kernels and autograd (fullgraph at the detector level, whose level sizes
    are known when tracing: tests/test_cope_detector.py)."""
    module = randomise(MSDeformAttn(8, 2, 2, 2, offset_mode="cope"))
    gen = torch.Generator().manual_seed(0)
    query, value = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 16, 8, generator=gen)
    ref = torch.rand(1, 3, 2, ref_dim, generator=gen)
    shapes, starts = torch.tensor([[3, 4], [2, 2]]), torch.tensor([0, 12])
    expected = module(query, ref, value, shapes, starts)
    compiled = torch.compile(module, backend="aot_eager")
    query.requires_grad_(True)
    got = compiled(query, ref, value, shapes, starts)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_inductor_fullgraph_of_the_module_with_level_sizes_given_as_ints() -> None:
    """torch.compile's default backend, fullgraph, forward and backward, on the module alone: level sizes given as
    (H, W) ints stay static sizes for CoPE's per-level slices (from a tensor they would be data to the compiler,
    which inductor cannot slice by); outputs and gradients as eager."""
    module = randomise(MSDeformAttn(8, 2, 2, 2, offset_mode="cope"))
    gen = torch.Generator().manual_seed(0)
    query, value = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 16, 8, generator=gen)
    ref = torch.rand(1, 3, 2, 2, generator=gen)
    shapes, starts = [(3, 4), (2, 2)], [0, 12]
    eager_query, compiled_query = query.clone().requires_grad_(True), query.clone().requires_grad_(True)
    expected = module(eager_query, ref, value, shapes, starts)
    got = torch.compile(module, fullgraph=True)(compiled_query, ref, value, shapes, starts)
    torch.testing.assert_close(got, expected)
    expected.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(compiled_query.grad, eager_query.grad)


def test_the_cost_benchmark_builds_the_cope_module_with_the_channels_asked_for(monkeypatch) -> None:
    """tools/benchmarks/benchmark_cope.py --cope-channels R: the cope module counts with R channels, linear is plain."""
    bench = load_tool("benchmarks/benchmark_cope")
    monkeypatch.setattr(bench, "LEVELS", ((4, 6), (2, 3)))
    built = []
    real = bench.MSDeformAttn

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(bench, "MSDeformAttn", recording)
    args = argparse.Namespace(device="cpu", dtype="float32", batch=1, repeats=1, warmup=0, isolate=False)
    args.cope_channels = 3
    for mode in ("linear", "cope"):
        bench.measure(mode, args, len_q=5, ref_dim=2, backward=True)
    assert built[0].cope is None
    assert built[1].cope.channels == 3 and built[1].cope.gate_query.shape[:2] == (8, 3)


def test_the_cost_benchmark_interleaves_the_two_modules(monkeypatch) -> None:
    """--interleave: both modules are built once and called alternately, linear first on even rounds."""
    bench = load_tool("benchmarks/benchmark_cope")
    monkeypatch.setattr(bench, "LEVELS", ((4, 6), (2, 3)))
    calls = []

    def build_step(mode, args, len_q, ref_dim, backward):
        return lambda: calls.append(mode)

    monkeypatch.setattr(bench, "build_step", build_step)
    args = argparse.Namespace(device="cpu", dtype="float32", batch=1, repeats=3, warmup=1, cope_channels=2)
    linear_ms, cope_ms = bench.measure_interleaved(args, len_q=5, ref_dim=2, backward=False)
    assert calls == ["linear", "cope", "linear", "cope", "cope", "linear", "linear", "cope"]
    assert linear_ms >= 0 and cope_ms >= 0


def test_an_empty_level_is_named() -> None:
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=2, n_points=2, offset_mode="cope")
    query, value = torch.randn(1, 5, 32), torch.randn(1, 6, 32)
    shapes, starts = torch.tensor([[0, 5], [2, 3]]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match=r"spatial_shapes \[\(0, 5\), \(2, 3\)\] has an empty level; CoPE counts"):
        attn(query, torch.rand(1, 5, 2, 2), value, shapes, starts)
