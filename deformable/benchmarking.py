"""Timing for the benchmark tools (``tools/benchmarks/``): one way to warm up, repeat, time and describe the machine.

    timing = time_calls(step, device=device, iters=10, warmup=2)
    print(f"{timing.median_ms:.2f} ms (spread {timing.spread_ms[0]:.2f}-{timing.spread_ms[1]:.2f})")

Each call of ``step`` is timed on its own, after ``warmup`` untimed calls:

- CPU: ``time.perf_counter`` around the call.
- CUDA: a pair of CUDA events around the call on the current stream, the calls queued back to back and the device
  synchronised once after the last, so that the times are device times without the host's launch gaps.

``before`` (e.g. overwriting a buffer larger than the L2 cache) runs before each timed call, outside its timing.

:func:`machine_info` / :func:`machine_lines` give the CPU, cores, torch threads, GPU, versions, the build of
``deformable._C`` and the command, which every benchmark prints above its table.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from . import _extension


@dataclass(frozen=True)
class Timing:
    """The times of the timed calls in milliseconds, in call order, and how they were taken."""

    times_ms: tuple[float, ...]
    warmup: int
    timer: str  # "perf_counter" | "cuda events"

    @property
    def iters(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def spread_ms(self) -> tuple[float, float]:
        """The fastest and the slowest timed call."""
        return min(self.times_ms), max(self.times_ms)

    def percentile_ms(self, q: float) -> float:
        """The ``q``-quantile (0..1) as the ``int(q * n)``-th fastest call (no interpolation: a time that was
        measured)."""
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def synchronize(device: torch.device | str) -> None:
    """Waits for ``device``'s queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    iters: int,
    warmup: int = 0,
    before: Callable[[], object] | None = None,
) -> Timing:
    """Calls ``fn()`` ``warmup`` times untimed, then ``iters`` times, each timed (see the module docstring).

    Raises:
        ValueError: ``iters < 1`` or ``warmup < 0``.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        return Timing(tuple(_cuda_times_ms(fn, iters, before)), warmup, "cuda events")
    times = []
    for _ in range(iters):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return Timing(tuple(times), warmup, "perf_counter")


def _cuda_times_ms(fn: Callable[[], object], iters: int, before: Callable[[], object] | None) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        if before is not None:
            before()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_once(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall seconds of one call, the device synchronised before and after (first calls: compilation, export)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def set_threads(threads: int | None) -> int:
    """``torch.set_num_threads(threads)`` when ``threads`` is positive; returns the intra-op thread count in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return name


def machine_info(devices: Iterable[torch.device | str] = ("cpu",)) -> dict[str, str | int | None]:
    """The machine, the build and the command: ``cpu``, ``logical_cores``, ``threads`` (torch intra-op), ``gpu``
    (when a CUDA device is among ``devices``), ``torch``, ``cuda``, ``build`` (of ``deformable._C``), ``command``."""
    on_gpu = any(torch.device(d).type == "cuda" for d in devices)
    build = _extension.build_info() if _extension.extension_loaded() else f"not loaded ({_extension.LOAD_ERROR})"
    return {
        "cpu": cpu_name(),
        "logical_cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build": build,
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }


def machine_lines(info: dict) -> list[str]:
    """:func:`machine_info` as markdown list items."""
    lines = [f"- CPU: {info['cpu']}, {info['logical_cores']} logical cores, {info['threads']} torch threads"]
    if info.get("gpu"):
        lines.append(f"- GPU: {info['gpu']} (CUDA {info['cuda']})")
    lines.append(f"- torch {info['torch']}, deformable._C built for: {info['build']}")
    lines.append(f"- command: `{info['command']}`")
    return lines
