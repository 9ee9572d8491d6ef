#!/usr/bin/env python
"""Inference latency of the deployment paths: PyTorch eager (native op), torch.compile and onnxruntime, on the CPU
and, when there is one, the GPU. Prints a Markdown report (machine, threads, command, table).

    python tools/benchmarks/benchmark_deploy.py --threads 8
    python tools/benchmarks/benchmark_deploy.py --paths eager,compile --cases shapes --iters 50

Cases: ``shapes`` (configs/shapes.yaml, the demo), ``shapes-cope`` (the same with CoPE offsets in the encoder and
the decoder) and ``coco`` (configs/coco.yaml, R50, 300 queries) at a small size, batch 1, random weights (latency
does not depend on them). ``compile`` is ``torch.compile`` with inductor (its compile time is reported apart);
``onnx`` exports with ``models.deploy.export_onnx`` as tools/export_onnx.py does (minutes for coco) and runs
onnxruntime with the CPU, or the CUDA execution provider when onnxruntime-gpu is installed. Times:
:func:`deformable.benchmarking.time_calls`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import tempfile
import warnings

import torch

from deformable.benchmarking import machine_info, machine_lines, set_threads, time_calls, time_once
from models.config import load_config
from models.deploy import ExportableDetector, example_images, export_onnx, load_for_export

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: configs/
CASES = {  # name: (config, overrides, (height, width))
    "shapes": (os.path.join(ROOT, "configs", "shapes.yaml"), [], (144, 192)),
    "shapes-cope": (
        os.path.join(ROOT, "configs", "shapes.yaml"),
        ["model.enc_offset_mode=cope", "model.dec_offset_mode=cope"],
        (144, 192),
    ),
    "coco": (os.path.join(ROOT, "configs", "coco.yaml"), [], (512, 512)),
}
PATHS = ("eager", "compile", "onnx")
LABELS = {"eager": "eager (native op)", "compile": "torch.compile (inductor)", "onnx": "onnxruntime"}


def _onnx_step(path: str, images: torch.Tensor, device: torch.device, threads: int):
    """An onnxruntime step on ``device``, or None when onnxruntime has no provider for it."""
    import onnxruntime

    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[device.type]
    if provider not in onnxruntime.get_available_providers():
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=[provider])
    feed = {"images": images.cpu().numpy()}
    return lambda: session.run(None, feed)


def bench_case(name: str, devices: list[torch.device], args: argparse.Namespace) -> list[str]:
    """Markdown rows of one case, one per device and path."""
    config, overrides, (height, width) = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": expected, latency does not depend on them
        model = ExportableDetector(load_for_export(load_config(config, overrides), None))
    rows = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        onnx_path, export_seconds = os.path.join(folder, "model.onnx"), 0.0
        if "onnx" in args.paths:  # once, on the CPU, for every device
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
                export = functools.partial(export_onnx, model.detector, onnx_path, example_images(2, height, width))
                export_seconds = time_once(export)
        for device in devices:
            model.to(device)
            images = example_images(1, height, width).to(device)
            for path in args.paths:
                setup = 0.0
                if path == "eager":
                    step = functools.partial(model, images)
                elif path == "compile":
                    step = functools.partial(torch.compile(model), images)
                    setup = time_once(step, device)
                else:
                    step = _onnx_step(onnx_path, images, device, args.threads)
                    setup = export_seconds
                if step is None:
                    rows.append(f"| {name} | {device.type} | onnxruntime | no {device.type} provider | | | |")
                    continue
                timing = time_calls(step, device=device, iters=args.iters, warmup=args.warmup)
                median, p90 = timing.median_ms, timing.percentile_ms(0.9)
                cells = [name, device.type, LABELS[path], f"1x{height}x{width}", f"{median:.1f}", f"{p90:.1f}"]
                rows.append("| " + " | ".join(cells) + f" | {setup:.0f} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--devices", default="cpu,cuda", help="cuda is skipped when there is no GPU")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime threads")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    args.paths = args.paths.split(",")
    for option, given, known in (("--cases", args.cases.split(","), CASES), ("--paths", args.paths, PATHS)):
        if bad := sorted(set(given) - set(known)):
            parser.error(f"{option}: unknown {bad}; choose from {', '.join(known)}")
    if bad := sorted(set(args.devices.split(",")) - {"cpu", "cuda"}):
        parser.error(f"--devices: unknown {bad}; choose from cpu, cuda")
    if args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--iters and --threads must be at least 1, --warmup at least 0")
    set_threads(args.threads)
    devices = [torch.device(d) for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        parser.error("--devices cuda: this machine has no GPU that torch can use")
    try:
        import onnxruntime

        versions = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        versions = "no onnxruntime (pip install '.[export]')"
        args.paths = [p for p in args.paths if p != "onnx"]

    print("## Deployment latency\n")
    print("\n".join(machine_lines(machine_info(devices))))
    print(f"- {versions}")
    print(f"- threads: {args.threads} (torch intra-op and onnxruntime intra-op); batch 1, random weights, fp32")
    print(
        f"- ms: median and 90th percentile of {args.iters} calls after {args.warmup} warm-up calls; setup s: "
        "torch.compile's first call, or the ONNX export\n"
    )
    print("| case | device | path | input | ms median | ms p90 | setup s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        print("\n".join(bench_case(name, devices, args)), flush=True)


if __name__ == "__main__":
    main()
