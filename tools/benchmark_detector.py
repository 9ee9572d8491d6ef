"""Benchmarks Deformable DETR (R50 multi-scale by default): a training step and inference, per device and per
multi-scale deformable attention backend, with the time share of backbone, encoder, decoder and loss.

    python tools/benchmark_detector.py --iters 10 --threads 8
    python tools/benchmark_detector.py --devices cuda --backends native,pytorch

Backends: "native" is the compiled op (the PyTorch path when the extension or its kernel for the device is missing;
the table says so), "pytorch" sets ``DEFORMABLE_BACKEND=pytorch``, which the op reads on every call.

The total is timed without instrumentation. The shares come from a second, instrumented run: forward and backward
hooks on ``backbone`` (with position encoding), ``transformer.encoder`` and ``transformer.decoder`` synchronise the
device and time each module's forward and backward; "loss" is the criterion's forward (matching included); "other"
is the rest (input projections, heads, query preparation, the loss backward, the optimiser step).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deformable import _extension  # noqa: E402
from models import build_criterion, build_detector, load_config  # noqa: E402

PARTS = ("backbone", "encoder", "decoder", "loss")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Accumulates the forward + backward time of named modules (device-synchronised hooks)."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self._handles = []
        for name, module in modules.items():
            self._handles += [
                module.register_forward_pre_hook(lambda *_, n=name: self.start(n)),
                module.register_forward_hook(lambda *_, n=name: self.stop(n)),
                module.register_full_backward_pre_hook(lambda *_, n=name: self.start(n)),
                module.register_full_backward_hook(lambda *_, n=name: self.stop(n)),
            ]

    def start(self, name: str) -> None:
        _sync(self.device)
        self._start[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        _sync(self.device)
        self.seconds[name] += time.perf_counter() - self._start.pop(name)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _targets(batch: int, device: torch.device, generator: torch.Generator) -> list[dict]:
    targets = []
    for _ in range(batch):
        centre = torch.rand(6, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(6, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(1, 91, (6,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], -1).to(device)})
    return targets


def _train_step(model, criterion, optimizer, images, targets, timer: PartTimer | None) -> None:
    outputs = model(images)
    if timer:
        timer.start("loss")
    losses = criterion(outputs, targets)
    if timer:
        timer.stop("loss")
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()


def _run(step, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return (time.perf_counter() - start) / iters


def benchmark(model, criterion, device, phase: str, shape: tuple[int, int, int], args) -> dict:
    """Times one phase ("train" or "infer") on random ``(B, H, W)`` images; returns total ms and shares."""
    batch, height, width = shape
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator).to(device)
    targets = _targets(batch, device, generator)
    if phase == "train":
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(timer=None):
            _train_step(model, criterion, optimizer, images, targets, timer)
    else:
        model.eval()

        def step(timer=None):
            with torch.no_grad():
                model(images)

    total = _run(step, args.iters, args.warmup, device)
    modules = {"backbone": model.backbone, "encoder": model.transformer.encoder, "decoder": model.transformer.decoder}
    timer = PartTimer(modules, device)
    if phase == "train":
        images.requires_grad_(True)  # so that the backbone's backward hook fires after its backward, not before
    instrumented = _run(lambda: step(timer), args.iters, 0, device)
    timer.remove()
    images.requires_grad_(False)
    shares = {part: timer.seconds[part] / args.iters / instrumented for part in PARTS if part in timer.seconds}
    return {"ms": total * 1e3, "shares": shares}


def _backend_label(backend: str, device: torch.device) -> str:
    if backend == "pytorch":
        return "pytorch"
    if _extension.extension_loaded() and _extension.native_supports(device.type):
        return "native"
    return "native (unavailable: PyTorch path)"


def _set_backend(backend: str) -> None:
    if backend == "pytorch":
        os.environ["DEFORMABLE_BACKEND"] = "pytorch"
    else:
        os.environ.pop("DEFORMABLE_BACKEND", None)


def _row(device: torch.device, backend: str, phase: str, shape: tuple[int, int, int], result: dict) -> str:
    shares = [result["shares"].get(p) for p in PARTS]
    other = 1 - sum(s for s in shares if s is not None)
    cells = [f"{100 * s:.0f}%" if s is not None else "-" for s in shares] + [f"{100 * other:.0f}%"]
    size = "x".join(map(str, shape))
    label = _backend_label(backend, device)
    return f"| {device.type} | {label} | {phase} | {size} | {result['ms']:.1f} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/coco.yaml")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="native,pytorch")
    parser.add_argument("--phases", default="train,infer")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cases = [("train", (2, 512, 512))] if "train" in args.phases else []
    cases += [("infer", (1, 800, 1333)), ("infer", (1, 512, 683))] if "infer" in args.phases else []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.iters} iterations")
    print("| device | backend | phase | batch x H x W | ms / iter | " + " | ".join(PARTS) + " | other |")
    print("|---" * (6 + len(PARTS)) + "|")
    for device in [torch.device(d) for d in args.devices.split(",")]:
        cfg = load_config(args.config, ["model.pretrained_backbone=false"])
        torch.manual_seed(0)
        model = build_detector(cfg).to(device)
        criterion = build_criterion(cfg)
        for backend in args.backends.split(","):
            _set_backend(backend)
            for phase, shape in cases:
                print(_row(device, backend, phase, shape, benchmark(model, criterion, device, phase, shape, args)))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
