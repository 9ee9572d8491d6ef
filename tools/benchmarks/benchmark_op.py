"""Benchmarks the multi-scale deformable attention op: the native kernel against the PyTorch (grid_sample) path.

    python tools/benchmarks/benchmark_op.py                                  # cpu (and cuda when present), both shapes
    python tools/benchmarks/benchmark_op.py --shapes decoder --iters 3       # a quick check
    python tools/benchmarks/benchmark_op.py --device cuda --dtypes float32,bfloat16 --iters 50

Shapes (Deformable DETR at 800x1333): "encoder" has levels (100,167), (50,84), (25,42), (13,21), so S = Lq = 22223,
with M = 8 heads, D = 32 channels, L = 4 levels, P = 4 points; "decoder" has the same value and Lq = 300.

Locations: "realistic" are reference points plus N(0, 2 px) offsets drawn per level and point, in pixels of the
sampled level. Encoder reference points are the pixel centres of each query's own level, used on every level (as
the encoder does with unpadded images); decoder reference points are uniform in [0, 1]. "uniform" locations are
uniform in [0, 1] (no locality: the worst case for caches). Attention weights are a softmax over L*P of N(0, 1).

Times: "fwd" is an inference forward (torch.no_grad, inputs that do not require grad); "fwd+bwd" is a forward with
value, locations and weights requiring grad plus the backward with a fixed random grad_output. Each is the median of
--iters runs after --warmup runs (default 10 after 2 on a CPU, 30 after 5 on a GPU), timed by
``deformable.benchmarking.time_calls``:
- cpu: each run timed with time.perf_counter.
- cuda: each run timed with a pair of CUDA events around it, the runs queued back to back; before each run a 256 MiB
  buffer is overwritten (outside the events), so that the inputs are not already in the GPU's L2 cache.

Memory floor (cuda rows only): the bytes the call must move (value, locations and weights read, output written; for
fwd+bwd also grad_output read, the inputs read again and their gradients written: tools/benchmarks/_bench_floor.py says
exactly what is counted) over the device-to-device copy bandwidth measured at the start of the run (1 GiB copied, read +
write). "floor us" is that time in microseconds, "x floor" the measured time over it.

Extra memory: the peak memory above what was allocated before the call (inputs and, for fwd+bwd, grad_output),
measured separately from the timing:
- cuda: torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() after torch.cuda.reset_peak_memory_stats();
  it counts tensor allocations, not the caching allocator's reserve.
- cpu: the resident set, read from /proc/self/status, in a fresh subprocess per (shape, batch, locations, path):
  the inputs are built, the peak is reset by writing "5" to /proc/self/clear_refs, the call runs once, and the
  result is VmHWM (peak resident) minus VmRSS at the reset. The subprocess runs with MALLOC_MMAP_THRESHOLD_=65536,
  so that glibc serves every buffer above 64 KiB with a fresh mmap and unmaps it when freed: resident memory then
  follows the live tensors instead of reusing freed pages, and the first call (no warm-up) is what is measured.
  The results are rounded to 0.1 MB; "-" means not measured (--no-memory) or not available (not Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import _bench_floor  # beside this file: the script's folder is on sys.path
import torch

from deformable import _extension, ms_deform_attn, ms_deform_attn_pytorch
from deformable.benchmarking import machine_info, machine_lines, set_threads, time_calls

ENCODER_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
HEADS, CHANNELS, POINTS = 8, 32, 4
DECODER_QUERIES = 300
OFFSET_STD_PX = 2.0
MB = 1e6
L2_FLUSH_BYTES = 256 << 20  # above any GPU's L2 (H100/H200: 50-60 MB)
DEFAULT_ITERS = {"cpu": (10, 2), "cuda": (30, 5)}  # (timed runs, warm-up runs)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _reference_points(shape: str, batch: int, gen: torch.Generator) -> torch.Tensor:
    """``(N, Lq, 2)`` normalised (x, y): encoder pixel centres of each query's level, decoder uniform."""
    if shape == "decoder":
        return torch.rand(batch, DECODER_QUERIES, 2, generator=gen)
    centres = []
    for h, w in ENCODER_LEVELS:
        y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        centres.append(torch.stack([x.flatten() / w, y.flatten() / h], -1))
    return torch.cat(centres).expand(batch, -1, -1)


def make_inputs(shape: str, batch: int, locations: str, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """``(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)`` on ``device``.

    value ``(N, S, M, D)`` in ``dtype``; locations ``(N, Lq, M, L, P, 2)`` and weights ``(N, Lq, M, L, P)`` float32.
    """
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(ENCODER_LEVELS, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n_levels, spatial = len(ENCODER_LEVELS), int(sizes.sum())
    queries = spatial if shape == "encoder" else DECODER_QUERIES
    size = (batch, queries, HEADS, n_levels, POINTS, 2)
    if locations == "uniform":
        loc = torch.rand(size, generator=gen)
    else:
        extent = spatial_shapes.flip(1).float().view(1, 1, 1, n_levels, 1, 2)  # (W, H) of each level
        ref = _reference_points(shape, batch, gen)[:, :, None, None, None, :]  # (N, Lq, 1, 1, 1, 2)
        loc = ref + torch.randn(size, generator=gen) * OFFSET_STD_PX / extent
    value = torch.randn(batch, spatial, HEADS, CHANNELS, generator=gen)
    weights = torch.randn(batch, queries, HEADS, n_levels * POINTS, generator=gen).softmax(-1).view(size[:-1])
    return (
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        loc.to(device),
        weights.to(device),
    )


def _run(fn: Callable[..., torch.Tensor], inputs: Inputs, backward: bool, grad_output: torch.Tensor | None) -> None:
    """One forward (under no_grad) or one forward + backward of ``fn``."""
    if not backward:
        with torch.no_grad():
            fn(*inputs)
        return
    value, spatial_shapes, level_start_index, loc, weights = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, weights)]
    fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2]).backward(grad_output)


def _grad_output(inputs: Inputs) -> torch.Tensor:
    value, loc = inputs[0], inputs[3]
    gen = torch.Generator().manual_seed(1)
    shape = (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    return torch.randn(shape, generator=gen).to(value.device, value.dtype)


def time_ms(fn: Callable, inputs: Inputs, backward: bool, iters: int, warmup: int) -> float:
    """Median time of one call in milliseconds: CUDA events on a GPU, each call after an L2 flush outside its events;
    wall time on a CPU (see the docstring)."""
    device = inputs[0].device
    grad_output = _grad_output(inputs) if backward else None
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    timing = time_calls(
        lambda: _run(fn, inputs, backward, grad_output),
        device=device,
        iters=iters,
        warmup=warmup,
        before=None if flush is None else lambda: flush.fill_(1),
    )
    return timing.median_ms


def cuda_extra_mb(fn: Callable, inputs: Inputs, backward: bool) -> float:
    grad_output = _grad_output(inputs) if backward else None
    _run(fn, inputs, backward, grad_output)  # warm-up: kernels loaded, workspace allocated
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _run(fn, inputs, backward, grad_output)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MB


def _memory_kb() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM", "VmRSS")))
    return {k: int(v.split()[0]) for k, v in fields.items()}


def cpu_extra_mb_worker(config: dict) -> dict[str, float]:
    """Runs in the fresh subprocess: the peak resident increase of one fwd and one fwd+bwd call (see the docstring)."""
    torch.set_num_threads(config["threads"])
    fn = PATHS[config["path"]]
    inputs = make_inputs(config["shape"], config["batch"], config["locations"], getattr(torch, config["dtype"]), "cpu")
    grad_output = _grad_output(inputs)
    result = {}
    for name, backward in (("fwd", False), ("fwd+bwd", True)):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak resident := current resident
        base = _memory_kb()["VmRSS"]
        _run(fn, inputs, backward, grad_output)
        result[name] = (_memory_kb()["VmHWM"] - base) * 1024 / MB
    return result


def cpu_extra_mb(config: dict) -> dict[str, float] | None:
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(config)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


PATHS: dict[str, Callable[..., torch.Tensor]] = {"native": ms_deform_attn, "pytorch": ms_deform_attn_pytorch}


def op_machine_info(devices: list[str], bandwidth: float | None) -> dict[str, str | int | float | None]:
    """The machine, the build and the command (:func:`deformable.benchmarking.machine_info`) and the measured GPU copy
    bandwidth, as written at the top of the output and into the JSON."""
    info = machine_info(devices)
    info["copy_bandwidth_gbs"] = None if bandwidth is None else bandwidth / 1e9
    return info


def op_machine_lines(info: dict) -> list[str]:
    lines = machine_lines(info)
    if info["copy_bandwidth_gbs"] is not None:  # after the GPU, before the torch and command lines
        gbs = info["copy_bandwidth_gbs"]
        lines.insert(-2, f"- GPU copy bandwidth: {gbs:.0f} GB/s (1 GiB device to device, read + write)")
    return lines


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _iters(args: argparse.Namespace, device: str) -> tuple[int, int]:
    """(timed runs, warm-up runs) on ``device``: the command line's, else the device's defaults."""
    iters, warmup = DEFAULT_ITERS["cuda" if device.startswith("cuda") else "cpu"]
    return (iters if args.iters is None else args.iters), (warmup if args.warmup is None else args.warmup)


def measure(args: argparse.Namespace, path: str, inputs: Inputs, config: dict) -> dict[str, float | None]:
    """``fwd_ms``, ``fwd_bwd_ms``, ``fwd_extra_mb``, ``fwd_bwd_extra_mb`` (None: not measured) of one path."""
    fn = PATHS[path]
    iters, warmup = _iters(args, str(inputs[0].device))
    result: dict[str, float | None] = {
        "fwd_ms": time_ms(fn, inputs, False, iters, warmup),
        "fwd_bwd_ms": time_ms(fn, inputs, True, iters, warmup),
    }
    memory = None
    if args.memory and inputs[0].is_cuda:
        memory = {"fwd": cuda_extra_mb(fn, inputs, False), "fwd+bwd": cuda_extra_mb(fn, inputs, True)}
    elif args.memory:
        memory = cpu_extra_mb(dict(config, path=path, threads=args.threads))
    result["fwd_extra_mb"] = None if memory is None else memory["fwd"]
    result["fwd_bwd_extra_mb"] = None if memory is None else memory["fwd+bwd"]
    return result


def floor_fields(inputs: Inputs, bandwidth: float) -> dict[str, float]:
    """Bytes and floor times of one configuration (``_bench_floor``), for the measured ``bandwidth`` (bytes/s)."""
    size = _bench_floor.OpSize.of(inputs[0], inputs[3])
    fields: dict[str, float] = {}
    for key, backward in (("fwd", False), ("fwd_bwd", True)):
        nbytes = _bench_floor.op_bytes(size, inputs[0].dtype, inputs[3].dtype, backward)
        fields[f"{key}_bytes"] = nbytes
        fields[f"{key}_floor_ms"] = _bench_floor.floor_ms(nbytes, bandwidth)
    return fields


def benchmark_case(
    args: argparse.Namespace, device: str, dtype: str, shape: str, batch: int, locations: str,
    bandwidth: float | None = None,
) -> list[dict]:  # fmt: skip
    """The records (one per path) of one configuration; with ``bandwidth`` (cuda) also the floor and the ratios."""
    inputs = make_inputs(shape, batch, locations, getattr(torch, dtype), device)
    config = {"shape": shape, "batch": batch, "locations": locations, "dtype": dtype}
    paths = ["native"] + ([] if args.skip_pytorch else ["pytorch"])
    results = {path: measure(args, path, inputs, config) for path in paths}
    native_supported = _extension.native_supports(device.split(":")[0])
    floor = floor_fields(inputs, bandwidth) if bandwidth is not None and device.startswith("cuda") else {}
    records = []
    for path, result in results.items():
        record = dict(config, device=device, path=path, **result)
        record["iters"], record["warmup"] = _iters(args, device)
        record["timer"] = "cuda events" if device.startswith("cuda") else "perf_counter"
        record["label"] = path if path == "pytorch" or native_supported else "native (fell back)"
        record["speedup_fwd"] = record["speedup_fwd_bwd"] = None
        if path == "native" and "pytorch" in results:
            record["speedup_fwd"] = results["pytorch"]["fwd_ms"] / result["fwd_ms"]
            record["speedup_fwd_bwd"] = results["pytorch"]["fwd_bwd_ms"] / result["fwd_bwd_ms"]
        if floor:
            record.update(floor)
            record["fwd_x_floor"] = result["fwd_ms"] / floor["fwd_floor_ms"]
            record["fwd_bwd_x_floor"] = result["fwd_bwd_ms"] / floor["fwd_bwd_floor_ms"]
        records.append(record)
    return records


HEADER = ["device", "dtype", "shape", "batch", "locations", "path", "fwd ms", "fwd+bwd ms", "fwd extra MB",
          "fwd+bwd extra MB", "speed-up fwd", "speed-up fwd+bwd"]  # fmt: skip
FLOOR_HEADER = ["fwd floor us", "fwd x floor", "fwd+bwd floor us", "fwd+bwd x floor"]


def format_row(record: dict, floor_columns: bool) -> str:
    """One markdown table row; times in ms with 3 decimals on a GPU (2 on a CPU), floors in microseconds."""
    digits = 3 if record["device"].startswith("cuda") else 2
    speedup = [_fmt(record[k]) + "x" if record[k] is not None else "-" for k in ("speedup_fwd", "speedup_fwd_bwd")]
    cells = [record["device"], record["dtype"], record["shape"], str(record["batch"]), record["locations"],
             record["label"], _fmt(record["fwd_ms"], digits), _fmt(record["fwd_bwd_ms"], digits),
             _fmt(record["fwd_extra_mb"]), _fmt(record["fwd_bwd_extra_mb"]), *speedup]  # fmt: skip
    if floor_columns:
        for key in ("fwd", "fwd_bwd"):
            floor_ms = record.get(f"{key}_floor_ms")
            ratio = record.get(f"{key}_x_floor")
            cells += [_fmt(None if floor_ms is None else 1e3 * floor_ms), "-" if ratio is None else f"{ratio:.1f}x"]
    return "| " + " | ".join(cells) + " |"


def write_json(path: str, info: dict, records: list[dict]) -> None:
    """The machine and every record so far (rewritten after each configuration, so an interrupted run leaves some)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"machine": info, "records": records}, f, indent=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_devices, help="comma-separated: cpu, cuda (default: all here)")
    parser.add_argument(
        "--dtypes", default=None, help="comma-separated (default: float32 on cpu, float32,bfloat16 on cuda)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed runs; the median is reported (default 10 on cpu, 30 on cuda)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2 on cpu, 5 on cuda)")
    parser.add_argument("--batch", default="1,2", help="comma-separated batch sizes (default 1,2)")
    parser.add_argument("--shapes", default="encoder,decoder", help="comma-separated: encoder, decoder")
    parser.add_argument("--locations", default="realistic,uniform", help="comma-separated: realistic, uniform")
    parser.add_argument("--skip-pytorch", action="store_true", help="time the native op only (no speed-up column)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the extra-memory columns")
    parser.add_argument("--json", metavar="PATH", help="also write the machine and every row to this JSON file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(cpu_extra_mb_worker(json.loads(args.memory_worker))))
        return
    if os.environ.pop("DEFORMABLE_BACKEND", None) is not None:
        print("note: DEFORMABLE_BACKEND was set and is ignored here: the table names the path of each row\n")
    set_threads(args.threads)
    devices = args.device.split(",")
    on_gpu = any(d.startswith("cuda") for d in devices)
    if on_gpu and not torch.cuda.is_available():
        sys.exit("benchmark_op.py: --device cuda asked for, but torch sees no CUDA device")
    bandwidth = _bench_floor.copy_bandwidth(next(d for d in devices if d.startswith("cuda"))) if on_gpu else None
    info = op_machine_info(devices, bandwidth)
    print("\n".join(op_machine_lines(info)) + "\n")
    header = HEADER + (FLOOR_HEADER if on_gpu else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    records: list[dict] = []
    for device in devices:
        dtypes = args.dtypes or ("float32,bfloat16" if device.startswith("cuda") else "float32")
        for dtype in dtypes.split(","):
            for shape in args.shapes.split(","):
                for batch in (int(b) for b in args.batch.split(",")):
                    for locations in args.locations.split(","):
                        case = benchmark_case(args, device, dtype, shape, batch, locations, bandwidth)
                        for record in case:
                            print(format_row(record, on_gpu), flush=True)
                        records += case
                        if args.json:
                            write_json(args.json, info, records)


if __name__ == "__main__":
    main()
