"""ms_deform_attn on the CPU: parity of the native kernel with the grid_sample reference (values and the three
gradients), low-precision value, non-contiguous and empty inputs, non-finite locations, determinism."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from _ops_utils import (
    HALF_TYPES,
    SHAPES,
    assert_close_scaled,
    noncontiguous,
    output_and_grads,
    random_grad,
    reference_output_and_grads,
    requires_native,
    sample_inputs,
)

from deformable import ms_deform_attn, ms_deform_attn_pytorch

# (batch, queries, heads, channels, shapes, points). Channels 16/32/64 take the kernel's fixed-size loops, the others
# the generic one; 12 points over 3 levels are 36 slots, more than the CPU kernel's block of 32.
CASES = [
    (1, 1, 1, 1, SHAPES, 1),
    (3, 7, 2, 3, SHAPES, 4),
    (1, 7, 3, 5, ((2, 3),), 4),
    (3, 1, 2, 16, ((5, 6), (1, 7), (3, 1), (2, 2)), 1),
    (1, 7, 2, 32, SHAPES, 4),
    (3, 7, 1, 64, ((4, 4), (2, 2)), 4),
    (2, 3, 2, 8, ((3, 3), (2, 5), (1, 1)), 12),
    (2, 5, 2, 4, ((3, 4), (0, 5), (2, 2)), 2),  # an empty level
]
CASE_IDS = [f"N{c[0]}-Lq{c[1]}-M{c[2]}-D{c[3]}-L{len(c[4])}-P{c[5]}" for c in CASES]
# Per dtype: tolerance on the output and gradients, relative to the largest reference magnitude (and at least 1).
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _inputs(case, **kwargs):
    batch, queries, heads, channels, shapes, points = case
    return sample_inputs(
        batch=batch, queries=queries, heads=heads, channels=channels, shapes=shapes, points=points, **kwargs
    )


def _check_against_reference(inputs, rtol: float, location_grad: bool = True) -> None:
    out, grad = output_and_grads(ms_deform_attn, inputs)
    assert out.dtype == inputs[0].dtype
    assert out.shape == (inputs[0].shape[0], inputs[3].shape[1], inputs[0].shape[2] * inputs[0].shape[3])
    ref, ref_grad = reference_output_and_grads(inputs, random_grad(out))
    assert_close_scaled(out, ref, rtol, "output")
    names = ("value", "sampling_locations", "attention_weights")
    for name, g, r, t in zip(names, grad, ref_grad, (inputs[0], inputs[3], inputs[4]), strict=True):
        assert g.dtype == t.dtype, name
        if location_grad or name != "sampling_locations":
            assert_close_scaled(g, r, rtol, f"grad of {name}")


@requires_native
@pytest.mark.parametrize("locations", ["inside", "border"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(case, dtype, locations):
    _check_against_reference(_inputs(case, dtype=dtype, locations=locations, seed=CASES.index(case)), RTOL[dtype])


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES[1:3] + CASES[-2:], ids=CASE_IDS[1:3] + CASE_IDS[-2:])
def test_matches_reference_on_edges(case, dtype):
    # Points exactly on the pixel values where the kernels switch cases (first fully-outside pixel, corner on the
    # edge, integer pixels). Location gradients are not compared: these are kinks, where the kernel (like the
    # original) and grid_sample take different one-sided derivatives, e.g. at pixel -1 exactly.
    _check_against_reference(_inputs(case, dtype=dtype, locations="edges"), RTOL[dtype], location_grad=False)


ISAS = ["base", "avx2", "avx512"]  # DEFORMABLE_CPU_ISA values, narrowest first
# Which of them this CPU runs (torch's own detection, which agrees with the kernel's for these three).
CPU_ISAS = ISAS[: {"AVX512": 3, "AVX2": 2}.get(torch.backends.cpu.get_cpu_capability(), 1)]


@requires_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=[CASE_IDS[1], CASE_IDS[3], CASE_IDS[4]])
def test_every_instruction_set_build_matches_reference(case, dtype, isa, monkeypatch):
    """The CPU loops are compiled for AVX-512, AVX2 and the baseline ISA; DEFORMABLE_CPU_ISA caps which a call runs
    (on a CPU without the named one, the widest below it runs). Each build must match the reference."""
    monkeypatch.setenv("DEFORMABLE_CPU_ISA", isa)
    _check_against_reference(_inputs(case, dtype=dtype, seed=7), RTOL[dtype])


@requires_native
@pytest.mark.skipif(len(CPU_ISAS) < 2, reason="this CPU runs only the baseline build")
def test_instruction_set_cap_takes_effect(monkeypatch):
    # The baseline build has no fused multiply-add, so its float32 sums round differently from the wider builds':
    # if the cap were ignored, both calls would run the same loops and agree bit for bit.
    inputs = _inputs(CASES[4], dtype=torch.float32, seed=3)
    outputs = {}
    for isa in ("base", CPU_ISAS[-1]):
        monkeypatch.setenv("DEFORMABLE_CPU_ISA", isa)
        outputs[isa] = output_and_grads(ms_deform_attn, inputs)
    (base_out, base_grads), (wide_out, wide_grads) = outputs.values()
    assert not torch.equal(base_out, wide_out) or not torch.equal(base_grads[0], wide_grads[0])


@requires_native
def test_unknown_instruction_set_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv("DEFORMABLE_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match=r"DEFORMABLE_CPU_ISA='sse9' is not one of base, avx2, avx512"):
        ms_deform_attn(*_inputs(CASES[1], dtype=torch.float32))


@requires_native
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("channels", [3, 16, 32])
def test_half_precision_value_matches_float64_reference(dtype, channels):
    # Locations and weights stay float32; the oracle is float64 on the same rounded values.
    inputs = sample_inputs(batch=2, queries=7, heads=2, channels=channels, points=4, dtype=dtype, seed=channels)
    _check_against_reference(inputs, RTOL[dtype])


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_the_pytorch_path_samples_half_precision_in_float32(dtype):
    """torch's half-precision grid_sample on the CPU is inaccurate (and can crash on large maps): the fallback samples
    in float32 as the kernels accumulate, within the half type's rounding of the float64 oracle."""
    inputs = sample_inputs(batch=2, queries=7, heads=2, channels=16, points=4, dtype=dtype, seed=3)
    out = ms_deform_attn_pytorch(*inputs)
    exact = ms_deform_attn_pytorch(*(x.double() if x.is_floating_point() else x for x in inputs))
    assert out.dtype == dtype
    assert_close_scaled(out, exact.to(dtype), RTOL[dtype], "output")
    # One 200 x 200 level read everywhere: where half-precision sampling returned NaN for a quarter of the queries.
    value = torch.randn(1, 200 * 200, 1, 8).to(dtype)
    shapes, start = torch.tensor([[200, 200]]), torch.tensor([0])
    locations = torch.rand(1, 1000, 1, 1, 4, 2, generator=torch.Generator().manual_seed(0))
    weights = torch.full((1, 1000, 1, 1, 4), 0.25)
    assert ms_deform_attn_pytorch(value, shapes, start, locations, weights).isfinite().all()


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES], ids=str)
def test_locations_of_another_dtype_are_cast(dtype):
    # The public function casts float64 locations/weights to the op's coordinate dtype (float32 here) and returns
    # their gradients in float64.
    inputs = sample_inputs(dtype=dtype, coord_dtype=torch.float64)
    out, grads = output_and_grads(ms_deform_attn, inputs)
    as32 = (*inputs[:3], inputs[3].float(), inputs[4].float())
    out32, grads32 = output_and_grads(ms_deform_attn, as32)
    assert grads[1].dtype == grads[2].dtype == torch.float64
    torch.testing.assert_close(out, out32, rtol=0, atol=0)
    for g, g32 in zip(grads, grads32, strict=True):
        torch.testing.assert_close(g, g32.to(g.dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noncontiguous_inputs_give_the_contiguous_results(backend, dtype):
    inputs = sample_inputs(batch=2, queries=5, heads=2, channels=4, points=3, dtype=dtype)
    strided = noncontiguous(inputs)
    assert not any(t.is_contiguous() for t in strided)
    go = torch.randn(8, 5, 2, dtype=dtype).transpose(0, 2)  # (N, Lq, M*D), a non-contiguous grad_output as well
    out, grads = output_and_grads(ms_deform_attn, inputs, go.contiguous())
    out_nc, grads_nc = output_and_grads(ms_deform_attn, strided, go)
    # The native kernels copy to contiguous first, so they agree bitwise; grid_sample's backward sums in another
    # order for other strides.
    tol = {"rtol": 0, "atol": 0} if backend == "native" else {}
    torch.testing.assert_close(out_nc, out, **tol)
    for g_nc, g in zip(grads_nc, grads, strict=True):
        torch.testing.assert_close(g_nc, g, **tol)


def _check_empty(batch: int, queries: int) -> None:
    inputs = sample_inputs(batch=batch, queries=queries, heads=2, channels=3)
    out, (grad_value, grad_locations, grad_weights) = output_and_grads(ms_deform_attn, inputs)
    assert out.shape == (batch, queries, 6)
    assert grad_value.shape == inputs[0].shape and grad_locations.shape == inputs[3].shape
    assert grad_weights.shape == inputs[4].shape
    assert not grad_value.any()


@pytest.mark.parametrize(("batch", "queries"), [(0, 3), (2, 0)], ids=["empty-batch", "no-queries"])
def test_empty_inputs(batch, queries, backend):
    _check_empty(batch, queries)


@requires_native
def test_no_positions_at_all():
    # Every level empty (S = 0): nothing can be sampled, the output is zeros on both paths.
    inputs = sample_inputs(shapes=((0, 4), (3, 0)), channels=3)
    out, (grad_value, grad_locations, grad_weights) = output_and_grads(ms_deform_attn, inputs)
    assert out.shape == (2, 3, 6) and not out.any()
    assert grad_value.shape == (2, 0, 2, 3) and not grad_locations.any() and not grad_weights.any()
    assert not ms_deform_attn_pytorch(*inputs).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_and_huge_locations_contribute_zero(dtype, backend):
    inputs = sample_inputs(batch=2, queries=4, heads=2, channels=5, points=3, dtype=dtype, locations="inside")
    value, spatial_shapes, level_start_index, loc, weights = inputs
    bad_values = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 3e9]
    loc = loc.clone()
    bad = torch.zeros(loc.shape[:-1], dtype=torch.bool)
    for i, v in enumerate(bad_values):  # one bad coordinate per point, x or y
        index = (i % 2, i % 4, i % 2, i % 3, i % 3)
        loc[index + (i % 2,)] = v
        bad[index] = True
    loc[1, 3, 1, 2, 2] = float("nan")  # both coordinates
    bad[1, 3, 1, 2, 2] = True
    out, (grad_value, grad_locations, grad_weights) = output_and_grads(
        ms_deform_attn, (value, spatial_shapes, level_start_index, loc, weights)
    )
    assert out.isfinite().all() and grad_value.isfinite().all()
    assert grad_locations.isfinite().all() and grad_weights.isfinite().all()
    assert not grad_locations[bad].any() and not grad_weights[bad].any()
    # Oracle: the same points with zero attention (and a harmless location, as grid_sample propagates NaN).
    oracle_inputs = (value, spatial_shapes, level_start_index, loc.masked_fill(bad[..., None], 0.5), weights * ~bad)
    ref, (ref_value, ref_locations, ref_weights) = reference_output_and_grads(oracle_inputs, random_grad(out))
    rtol = RTOL[dtype]
    assert_close_scaled(out, ref, rtol, "output")
    assert_close_scaled(grad_value, ref_value, rtol, "grad of value")
    assert_close_scaled(grad_locations[~bad], ref_locations[~bad], rtol, "grad of sampling_locations")
    assert_close_scaled(grad_weights[~bad], ref_weights[~bad], rtol, "grad of attention_weights")


@requires_native
def test_backward_is_deterministic_across_runs_and_thread_counts():
    # Big enough that both the forward (parallel over queries) and the backward (over batch x heads) split.
    inputs = sample_inputs(batch=2, queries=200, heads=2, channels=16, points=4, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            results.append(output_and_grads(ms_deform_attn, inputs))
    finally:
        torch.set_num_threads(threads)
    (out, grads), others = results[0], results[1:]
    for other_out, other_grads in others:
        assert torch.equal(other_out, out)
        assert all(torch.equal(a, b) for a, b in zip(other_grads, grads, strict=True))


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_many_queries_are_visited_in_spatial_order_with_the_same_result(dtype):
    """With many queries per position (Lq * L * P >= S) the CPU forward visits query rows by where their first
    sampling point lies; every row must still land in its own place, with the result of computing it alone
    (one query per call takes the in-order path). Includes NaN and far-away first points, which key the order."""
    inputs = sample_inputs(batch=2, queries=60, heads=2, channels=16, points=2, dtype=dtype, locations="border")
    value, spatial_shapes, level_start_index, loc, weights = inputs
    assert loc.shape[1] * loc.shape[3] * loc.shape[4] >= value.shape[1]  # the reordered path
    loc = loc.clone()
    loc[0, 5, 0, 0, 0] = float("nan")
    loc[1, 7, 0, 0, 0] = torch.tensor([-40.0, 1e30], dtype=dtype)
    out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, weights)
    for n in range(loc.shape[0]):
        for q in range(loc.shape[1]):
            alone = ms_deform_attn(
                value[n : n + 1],
                spatial_shapes,
                level_start_index,
                loc[n : n + 1, q : q + 1],
                weights[n : n + 1, q : q + 1],
            )
            assert torch.equal(out[n, q], alone[0, 0]), (n, q)


@requires_native
def test_scratch_memory_reused_across_calls_of_other_sizes_and_threads():
    """The CPU kernels keep per-thread scratch buffers (head-major copies) between calls; a call after a larger
    or smaller one, or calls from several Python threads at once, must give what a first call gives."""
    small = sample_inputs(batch=1, queries=40, heads=2, channels=16, points=2, dtype=torch.float32, seed=1)
    large = sample_inputs(batch=2, queries=90, heads=3, channels=32, points=3, dtype=torch.float32, seed=2)
    assert all(x[3].shape[1] * x[3].shape[3] * x[3].shape[4] >= x[0].shape[1] for x in (small, large))
    expected = {name: output_and_grads(ms_deform_attn, x) for name, x in (("small", small), ("large", large))}

    def same(name, got):
        (out, grads), (ref_out, ref_grads) = got, expected[name]
        return torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))

    for name, x in (("large", large), ("small", small), ("large", large), ("small", small)):
        assert same(name, output_and_grads(ms_deform_attn, x)), name
    with ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [
            (name, pool.submit(output_and_grads, ms_deform_attn, x))
            for name, x in [("small", small), ("large", large)] * 4
        ]
        assert all(same(name, job.result()) for name, job in jobs)


@requires_native
@pytest.mark.parametrize("queries", [1, 20], ids=["few-queries", "many-queries"])
def test_corners_outside_the_map_read_nothing_from_value(queries):
    """Points straddle the bottom-right edge of every level, so some of their corners lie outside the map. value
    is NaN everywhere but the 2 x 2 bottom-right pixels of each level (the only ones such points touch), so any
    read of another value row (or of a head-major copy's stand-in row for outside corners left unset) turns the
    output or a gradient into NaN. A call on NaN-filled inputs of other sizes goes first, to fill the kernels'
    reused scratch memory with NaN. 20 queries take the head-major path (Lq * L * P >= S), 1 query the other."""
    shapes = ((4, 5), (3, 3))
    dirty = sample_inputs(batch=2, queries=60, heads=2, channels=8, shapes=((6, 7), (3, 3)), points=2, seed=3)
    output_and_grads(ms_deform_attn, (dirty[0].fill_(float("nan")),) + dirty[1:])
    value, spatial_shapes, level_start_index, loc, weights = sample_inputs(
        batch=2, queries=queries, heads=2, channels=8, shapes=shapes, points=2, seed=4
    )
    gen = torch.Generator().manual_seed(5)
    extent = torch.tensor([[w, h] for h, w in shapes], dtype=loc.dtype).view(1, 1, 1, -1, 1, 2)
    pixel = extent - 1.9 + 1.8 * torch.rand(loc.shape, generator=gen, dtype=loc.dtype)  # in (W - 1.9, W - 0.1)
    loc = (pixel + 0.5) / extent
    keep = torch.zeros(value.shape[1], dtype=torch.bool)
    for (h, w), start in zip(shapes, level_start_index.tolist(), strict=True):
        for row in (h - 2, h - 1):
            keep[start + row * w + w - 2 : start + row * w + w] = True
    value = value.masked_fill(~keep[None, :, None, None], float("nan"))
    inputs = (value, spatial_shapes, level_start_index, loc, weights)
    assert (queries * 2 * 2 >= value.shape[1]) == (queries == 20)
    out, grads = output_and_grads(ms_deform_attn, inputs)
    assert out.isfinite().all() and all(g.isfinite().all() for g in grads)
    ref, ref_grads = reference_output_and_grads(inputs, random_grad(out))
    assert_close_scaled(out, ref, RTOL[value.dtype], "output")
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads, strict=True):
        assert_close_scaled(g, r, RTOL[value.dtype], f"grad of {name}")


@requires_native
def test_many_queries_on_a_tall_first_level_match_reference():
    # A first level 2000 x 1 with 125 queries x 16 points: many queries (Lq * L * P >= S), but more order keys
    # than rows, which the CPU kernels sort by comparison rather than by counting. float64: in float32 a
    # normalised y times 2000 rows is off by ~1e-4 pixel, beyond the float32 tolerance of these tests.
    dtype = torch.float64
    inputs = sample_inputs(batch=1, queries=125, heads=2, channels=4, shapes=((2000, 1),), points=16, dtype=dtype)
    _check_against_reference(inputs, RTOL[dtype])
