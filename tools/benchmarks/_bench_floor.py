"""The memory floor of ``ms_deform_attn`` on a GPU: the fewest bytes one call must move through device memory, over
the copy bandwidth measured on that GPU. ``tools/benchmarks/benchmark_op.py`` prints it beside each CUDA time.

Sizes: N batch, S = sum of H_l * W_l over the levels, Lq queries, M heads, D channels per head, L levels, P points.
Each tensor is counted once, at its own element size:

forward ("fwd"):
  read  value                ``N * S * M * D``           elements of value's dtype
  read  sampling_locations   ``N * Lq * M * L * P * 2``  elements of the locations' dtype
  read  attention_weights    ``N * Lq * M * L * P``      elements of the weights' dtype
  write output               ``N * Lq * M * D``          elements of value's dtype

forward + backward ("fwd+bwd", the forward above, then the backward of the op):
  the forward's bytes, plus
  read  grad_output                                      the output's size
  read  value, sampling_locations, attention_weights     again
  write grad_value, grad_sampling_locations, grad_attention_weights, each its input's size and dtype
  in all 3 x (value + locations + weights) + 2 x output.

Not counted: spatial_shapes and level_start_index (3 * L int64, under 100 bytes), value rows read again by nearby
sampling points (a cache serves those), the zeroing of grad_value before the scattered adds, an fp32 accumulation
buffer of a half-precision backward, and autograd's own work between forward and backward. So the floor is a bound no
kernel beats: measured / floor says how far a kernel is from moving each byte once at copy speed.

Bandwidth: :func:`copy_bandwidth` copies one large buffer (1 GiB, far above any GPU's L2) device to device, timed with
CUDA events (:func:`deformable.benchmarking.time_calls`), and counts ``2 * bytes`` per copy (a copy reads and writes
each byte); the median of the timed copies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from deformable.benchmarking import time_calls

GIB = 1 << 30


@dataclass(frozen=True)
class OpSize:
    """The sizes of one ``ms_deform_attn`` call (see the module docstring for the letters)."""

    batch: int
    spatial: int
    queries: int
    heads: int
    channels: int
    levels: int
    points: int

    @classmethod
    def of(cls, value: torch.Tensor, sampling_locations: torch.Tensor) -> OpSize:
        """From value ``(N, S, M, D)`` and sampling_locations ``(N, Lq, M, L, P, 2)``."""
        batch, spatial, heads, channels = value.shape
        _, queries, _, levels, points, _ = sampling_locations.shape
        return cls(batch, spatial, queries, heads, channels, levels, points)


def tensor_bytes(size: OpSize, value_dtype: torch.dtype, coord_dtype: torch.dtype) -> dict[str, int]:
    """Bytes of value, sampling_locations, attention_weights and output; locations and weights in ``coord_dtype``."""
    slots = size.batch * size.queries * size.heads * size.levels * size.points
    return {
        "value": size.batch * size.spatial * size.heads * size.channels * value_dtype.itemsize,
        "sampling_locations": 2 * slots * coord_dtype.itemsize,
        "attention_weights": slots * coord_dtype.itemsize,
        "output": size.batch * size.queries * size.heads * size.channels * value_dtype.itemsize,
    }


def op_bytes(size: OpSize, value_dtype: torch.dtype, coord_dtype: torch.dtype, backward: bool) -> int:
    """Bytes a forward (``backward=False``) or a forward + backward must move, as counted in the module docstring."""
    t = tensor_bytes(size, value_dtype, coord_dtype)
    inputs = t["value"] + t["sampling_locations"] + t["attention_weights"]
    if not backward:
        return inputs + t["output"]
    return 3 * inputs + 2 * t["output"]


def floor_ms(nbytes: int, bandwidth: float) -> float:
    """Milliseconds to move ``nbytes`` at ``bandwidth`` bytes per second."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    return 1e3 * nbytes / bandwidth


def copy_bandwidth(device: str = "cuda", nbytes: int = GIB, iters: int = 20, warmup: int = 3) -> float:
    """Device-to-device copy bandwidth in bytes per second, read + write: ``2 * nbytes`` over the median copy time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()  # not zeros: nothing special to copy
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    seconds = time_calls(copy, device=device, iters=iters, warmup=warmup).median_ms / 1e3
    del src, dst, copy
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds
