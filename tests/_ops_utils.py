"""Shared helpers of the ms_deform_attn op tests: sample inputs, the float64 oracle and gradient runners."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from deformable import _extension, ms_deform_attn_pytorch

# Levels with a 1xW and an Hx1 map, the shapes that break (H, W) swaps and stride mistakes.
SHAPES = ((3, 4), (1, 5), (4, 1))
HALF_TYPES = (torch.float16, torch.bfloat16)

requires_native = pytest.mark.skipif(
    not _extension.extension_loaded(), reason=f"deformable._C is not built: {_extension.LOAD_ERROR}"
)


Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def level_tensors(
    shapes: Sequence[Sequence[int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(spatial_shapes (L, 2), level_start_index (L,))`` int64 for the given ``(H, W)`` rows."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device).view(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def _locations(kind: str, size: tuple[int, ...], shapes: Sequence[Sequence[int]], gen: torch.Generator) -> torch.Tensor:
    """``(N, Lq, M, L, P, 2)`` float64 normalised ``(x, y)``.

    "inside": uniform in [0, 1]. "border": uniform in [-0.3, 1.3], so that points lie fully outside, across the
    edge (some corners outside) and inside. "edges": like "border", with half the coordinates snapped to values
    where the kernels switch cases: pixel -1 and H or W (the first fully outside points), -0.5 (corner on the
    edge), 0 and H-1 or W-1, and integer pixels inside.
    """
    if kind == "inside":
        return torch.rand(size, generator=gen, dtype=torch.float64)
    loc = torch.rand(size, generator=gen, dtype=torch.float64) * 1.6 - 0.3
    if kind == "border":
        return loc
    if kind != "edges":
        raise ValueError(f"unknown locations kind {kind!r}")
    extent = torch.tensor([[max(w, 1), max(h, 1)] for h, w in shapes], dtype=torch.float64)  # (L, 2) as (W, H)
    extent = extent.view(1, 1, 1, -1, 1, 2)
    choices = torch.tensor([-1.5, -1.0, -0.5, 0.0, 1.0, 2.0, 1e9], dtype=torch.float64)  # 1e9 -> the far edge
    pick = choices[torch.randint(len(choices), size, generator=gen)]
    pixel = torch.where(pick > 1e8, extent.expand(size) - torch.randint(0, 2, size, generator=gen), pick)
    snapped = (pixel + 0.5) / extent
    return torch.where(torch.rand(size, generator=gen) < 0.5, snapped, loc)


def avoid_kinks(locations: torch.Tensor, shapes: Sequence[Sequence[int]], margin: float = 1e-3) -> torch.Tensor:
    """Moves every pixel coordinate ``loc * W - 0.5`` (and ``loc * H - 0.5``) at least ``margin`` away from an
    integer: bilinear sampling, and the in-map test, have kinks there, where gradcheck's differences fail."""
    extent = torch.tensor([[w, h] for h, w in shapes], dtype=locations.dtype, device=locations.device)
    extent = extent.view(1, 1, 1, -1, 1, 2)
    pixel = locations * extent - 0.5
    distance = (pixel - pixel.round()).abs()
    pixel = torch.where(distance < margin, pixel + 2 * margin, pixel)
    return (pixel + 0.5) / extent


def sample_inputs(
    *,
    batch: int = 2,
    queries: int = 3,
    heads: int = 2,
    channels: int = 4,
    shapes: Sequence[Sequence[int]] = SHAPES,
    points: int = 2,
    dtype: torch.dtype = torch.float64,
    coord_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    locations: str = "border",
    kink_margin: float = 0.0,
    requires_grad: bool = False,
    seed: int = 0,
) -> Inputs:
    """``(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`` for the op.

    value ``(N, S, M, D)`` in ``dtype``; locations ``(N, Lq, M, L, P, 2)`` and weights ``(N, Lq, M, L, P)`` in
    ``coord_dtype`` (default: float64 for float64 value, else float32, which is what the raw op wants). Weights are
    softmaxed over ``L * P`` like the module's. Everything is drawn on the CPU from ``seed`` and then moved, so that a
    CUDA test sees the same numbers as the CPU oracle.
    """
    if coord_dtype is None:
        coord_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(shapes, device)
    n_levels = len(shapes)
    spatial = sum(h * w for h, w in shapes)
    value = torch.randn(batch, spatial, heads, channels, generator=gen, dtype=torch.float64)
    size = (batch, queries, heads, n_levels, points, 2)
    loc = _locations(locations, size, shapes, gen)
    if kink_margin > 0:
        loc = avoid_kinks(loc, shapes, kink_margin)
    logits = torch.randn(batch, queries, heads, n_levels * points, generator=gen, dtype=torch.float64)
    weights = logits.softmax(-1).view(size[:-1])
    tensors = [value.to(device, dtype), loc.to(device, coord_dtype), weights.to(device, coord_dtype)]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    value, loc, weights = tensors
    return value, spatial_shapes, level_start_index, loc, weights


def oracle(inputs: Inputs) -> Inputs:
    """The inputs as float64 CPU leaves that require grad: the reference is run on exactly the rounded values the
    kernel saw, so that the only differences left are the kernel's own rounding."""
    value, spatial_shapes, level_start_index, loc, weights = inputs
    as64 = [t.detach().cpu().double().requires_grad_() for t in (value, loc, weights)]
    return as64[0], spatial_shapes.cpu(), level_start_index.cpu(), as64[1], as64[2]


def random_grad(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A standard normal gradient for ``out`` (its shape, dtype and device), the same numbers on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)


def output_and_grads(
    fn: Callable[..., torch.Tensor], inputs: Inputs, grad_output: torch.Tensor | None = None, seed: int = 1
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Runs ``fn(*inputs)`` and its backward with ``grad_output`` (random by default, in the output's dtype).

    Returns the output and the gradients of value, sampling_locations and attention_weights. The three become
    fresh leaves (detached views that keep their strides), so the same inputs can be run through several paths.
    """
    value, spatial_shapes, level_start_index, loc, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]
    out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    if grad_output is None:
        grad_output = random_grad(out, seed)
    out.backward(grad_output)
    return out.detach(), [leaf.grad for leaf in leaves]


def reference_output_and_grads(inputs: Inputs, grad_output: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The float64 oracle's output and gradients for ``inputs`` and ``grad_output``."""
    return output_and_grads(ms_deform_attn_pytorch, oracle(inputs), grad_output.detach().cpu().double())


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "") -> None:
    """``|actual - expected| <= rtol * max(1, max|expected|)`` elementwise: for low-precision outputs whose error
    scales with the magnitude of the whole sum rather than with each element."""
    expected = expected.detach().cpu().double()
    actual = actual.detach().cpu().double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


def noncontiguous(inputs: Inputs) -> Inputs:
    """The same values in non-contiguous layouts: value as a transposed view, locations permuted, weights and
    level_start_index strided, spatial_shapes transposed."""
    value, spatial_shapes, level_start_index, loc, weights = inputs
    value_nc = value.detach().transpose(1, 2).contiguous().transpose(1, 2)  # an (N, M, S, D) buffer
    loc_nc = loc.detach().permute(0, 2, 1, 3, 4, 5).contiguous().permute(0, 2, 1, 3, 4, 5)
    weights_nc = torch.stack([weights.detach(), torch.zeros_like(weights)], -1)[..., 0]
    shapes_nc = spatial_shapes.t().contiguous().t()
    starts_nc = torch.stack([level_start_index, torch.zeros_like(level_start_index)], -1)[:, 0]
    return value_nc, shapes_nc, starts_nc, loc_nc, weights_nc
