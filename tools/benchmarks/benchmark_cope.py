"""Overhead of ``MSDeformAttn(offset_mode="cope")`` over ``"linear"`` at Deformable DETR encoder and decoder shapes.

Times the whole module (projections, sampling locations, the op) forward, and forward + backward, and prints a
markdown table with the cope / linear ratio and peak memory (on CUDA the allocator's peak; on CPU with ``--isolate``
the peak resident memory of a process running that configuration alone, above its module and inputs). The op path
is whatever ``deformable.ms_deform_attn`` picks (native kernel or the PyTorch fallback); the table says which. With
``--interleave`` the two modules' calls alternate in one process (the ratio is then steadier on a machine whose
speed drifts; no memory columns).

    python tools/benchmarks/benchmark_cope.py --device cuda
    python tools/benchmarks/benchmark_cope.py --device cpu --repeats 3 --batch 1 --threads 2 --isolate
    python tools/benchmarks/benchmark_cope.py --device cpu --repeats 15 --batch 1 --threads 2 --interleave
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import sys
import warnings

import torch

from deformable import MSDeformAttn, native_available
from deformable.benchmarking import machine_info, machine_lines, set_threads, time_calls

NAN = float("nan")
# Four levels of an 800x1333 image at strides 8-64: S = 22223 positions.
LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))


def inputs(batch: int, len_q: int, ref_dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s = int(sizes.sum())
    query = torch.randn(batch, len_q, 256, generator=gen).to(device, dtype)
    value = torch.randn(batch, s, 256, generator=gen).to(device, dtype)
    ref = torch.rand(batch, len_q, len(LEVELS), ref_dim, generator=gen)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.3 + 0.02
    mask = torch.zeros(batch, s, dtype=torch.bool)
    return query, ref.to(device, dtype), value, shapes, starts, mask.to(device)


def build_step(mode: str, args: argparse.Namespace, len_q: int, ref_dim: int, backward: bool):
    """One call of the ``mode`` module on the benchmark's inputs (forward, and backward when asked), as a function."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    extra = {"cope_channels": args.cope_channels} if mode == "cope" else {}
    module = MSDeformAttn(256, len(LEVELS), 8, 4, offset_mode=mode, **extra).to(device, dtype)
    with torch.no_grad():  # spread the gates so that the cope path does real work
        if module.cope is not None:
            module.cope.gate_query.normal_(std=0.02)
    query, ref, value, shapes, starts, mask = inputs(args.batch, len_q, ref_dim, device, dtype)
    if backward:
        query.requires_grad_(True)
        value.requires_grad_(True)

    def step():
        with torch.set_grad_enabled(backward):
            out = module(query, ref, value, shapes, starts, mask)
            if backward:
                out.sum().backward()

    return step


def measure(mode: str, args: argparse.Namespace, len_q: int, ref_dim: int, backward: bool) -> tuple[float, float]:
    """(milliseconds, peak MiB or nan) of one configuration."""
    device = torch.device(args.device)
    step = build_step(mode, args, len_q, ref_dim, backward)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _max_rss_mib()
    ms = time_calls(step, device=device, iters=args.repeats, warmup=args.warmup).median_ms
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    elif args.isolate:  # the process's high-water mark above what the module and inputs already held
        peak = _max_rss_mib() - rss_before
    else:
        peak = float("nan")
    return ms, peak


def _max_rss_mib() -> float:
    """The process's peak resident memory in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS); NaN where the
    ``resource`` module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def measure_interleaved(args: argparse.Namespace, len_q: int, ref_dim: int, backward: bool) -> tuple[float, float]:
    """(linear ms, cope ms): medians of calls of the two modules alternating (linear first on even rounds, cope on
    odd ones), so that both see the same machine: on a shared VM, whose speed drifts over seconds, their ratio is
    then steadier than from two runs one after the other. No memory figure."""
    device = torch.device(args.device)
    steps = {mode: build_step(mode, args, len_q, ref_dim, backward) for mode in ("linear", "cope")}
    times: dict[str, list[float]] = {"linear": [], "cope": []}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    for i in range(args.repeats):
        for mode in ("linear", "cope") if i % 2 == 0 else ("cope", "linear"):
            times[mode].extend(time_calls(steps[mode], device=device, iters=1).times_ms)
    return statistics.median(times["linear"]), statistics.median(times["cope"])


def measure_isolated(mode: str, args: argparse.Namespace, len_q: int, ref_dim: int, backward: bool):
    """:func:`measure` in a fresh process, so that its peak resident memory is this configuration's alone.

    The child's glibc serves every allocation from 64 KiB up with its own mapping, returned when freed: its peak
    resident memory then follows the live tensors instead of what the allocator kept cached, and repeats to the MiB
    (it moved by tens of MiB between runs without this)."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by glibc when the spawned child starts
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child, (mode, args, len_q, ref_dim, backward))


def _child(mode: str, args: argparse.Namespace, len_q: int, ref_dim: int, backward: bool):
    set_threads(args.threads)
    warnings.filterwarnings("ignore", message="deformable: the native extension")
    return measure(mode, args, len_q, ref_dim, backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--cope-channels", type=int, default=2, help="counting channels per head (the default 2)")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="CPU: each configuration in its own process; the peak columns are then its peak resident memory above "
        "the module and inputs",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time linear and cope calls alternately in one process (steadier ratios on a noisy machine; no memory)",
    )
    args = parser.parse_args()
    if args.interleave and args.isolate:
        parser.error("--interleave and --isolate exclude each other: memory needs each configuration alone")
    set_threads(args.threads)
    warnings.filterwarnings("ignore", message="deformable: the native extension")

    s = sum(h * w for h, w in LEVELS)
    cases = [("encoder", s, 2), ("decoder", 300, 4)]
    op_path = "native" if native_available() else "pytorch"
    print("\n".join(machine_lines(machine_info([args.device]))) + "\n")
    print(
        f"device {args.device}, {args.dtype}, batch {args.batch}, levels {LEVELS} (S = {s}), d_model 256, "
        f"8 heads x 4 points, {args.cope_channels} counting channels, op path {op_path}, median of {args.repeats}"
    )
    print("| shape | pass | linear ms | cope ms | ratio | linear peak MiB | cope peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, len_q, ref_dim in cases:
        for backward in (False, True):
            if args.interleave:
                (lin_ms, cope_ms), lin_mem, cope_mem = measure_interleaved(args, len_q, ref_dim, backward), NAN, NAN
            else:
                run = measure_isolated if args.isolate else measure
                lin_ms, lin_mem = run("linear", args, len_q, ref_dim, backward)
                cope_ms, cope_mem = run("cope", args, len_q, ref_dim, backward)
            label = f"{name} (Lq {len_q}, {ref_dim}-d refs)"
            pass_name = "fwd+bwd" if backward else "fwd"
            print(
                f"| {label} | {pass_name} | {lin_ms:.1f} | {cope_ms:.1f} | {cope_ms / lin_ms:.2f} | "
                f"{_mib(lin_mem)} | {_mib(cope_mem)} |",
                flush=True,
            )


def _mib(peak: float) -> str:
    """Peak memory for the table: measured on CUDA only ("-" elsewhere)."""
    return "-" if math.isnan(peak) else f"{peak:.0f}"


if __name__ == "__main__":
    main()
