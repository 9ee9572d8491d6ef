#!/usr/bin/env python
"""Training throughput (images/s) of the demo config and of the COCO config, on synthetic batches.

    python tools/benchmarks/benchmark_train.py [--device auto|cpu|cuda] [--iters N] [--warmup N] [--amp none|bf16|fp16]
        [--ema-decay D]

Runs ``deformable.training.engine.train_one_epoch`` (forward, loss, backward, clipping, AdamW step) on random images
with a few random boxes: the demo at its batch size and largest training scale, COCO at batch 2 and 800 x 1066 (a
480 x 640 image resized to the shorter side 800). No data set or pretrained weights are needed. Each step is timed on
its own (``deformable.benchmarking.time_calls``); images/s is the batch size over the mean step time. ``--ema-decay``
adds the moving average of the weights (``train.ema_decay``) updated after every step, as training does, and
reports its update's own time.
"""

from __future__ import annotations

import argparse
import os
import sys

# As in tools/train.py: idle OpenMP threads sleep instead of spinning (shared CPUs), so the numbers match training.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from deformable.benchmarking import machine_info, machine_lines, time_calls
from deformable.training.ema import build_ema, check_ema_decay
from deformable.training.engine import train_one_epoch
from deformable.training.optim import build_optimizer
from models import build_criterion, build_detector
from models.config import Config, load_config
from models.device import resolve_device

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: configs/


def synthetic_batches(
    count: int, batch_size: int, height: int, width: int, num_classes: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    """``count`` batches of ``(images (B, 3, H, W), mask (B, H, W) all False, targets with 1-5 boxes)``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randn(batch_size, 3, height, width, generator=g)
        mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
        targets = []
        for _ in range(batch_size):
            n = int(torch.randint(1, 6, (), generator=g))
            centres, sizes = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05
            labels = torch.randint(1, num_classes, (n,), generator=g)
            targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
        batches.append((images, mask, targets))
    return batches


def benchmark(
    cfg: Config, batch_size: int, height: int, width: int, args: argparse.Namespace
) -> tuple[float, float | None]:
    """Images per second of training steps on ``args.device`` (warm-up steps excluded) and, with ``--ema-decay``,
    the milliseconds of the moving average's update alone (timed on its own after the steps; else None)."""
    device = resolve_device(args.device)
    cfg.model.pretrained_backbone = False
    model = build_detector(cfg).to(device)
    criterion = build_criterion(cfg).to(device)
    optimizer = build_optimizer(model, cfg.train)
    batches = synthetic_batches(args.warmup + args.iters, batch_size, height, width, cfg.model.num_classes)
    kwargs = dict(device=device, epoch=0, clip_max_norm=cfg.train.clip_max_norm, amp=args.amp, show_progress=False)
    kwargs["ema"] = ema = build_ema(model, args.ema_decay)
    kwargs["scaler"] = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    batch_iter = iter(batches)

    def step() -> None:
        train_one_epoch(model, criterion, [next(batch_iter)], optimizer, **kwargs)

    seconds = time_calls(step, device=device, iters=args.iters, warmup=args.warmup).mean_ms / 1e3
    if ema is None:
        return batch_size / seconds, None
    update = time_calls(lambda: ema.update_parameters(model), device=device, iters=args.iters, warmup=args.warmup)
    return batch_size / seconds, update.mean_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--only", choices=["demo", "coco"], help="run one of the two")
    parser.add_argument("--ema-decay", type=float, default=0.0, help="train.ema_decay (0: no moving average)")
    args = parser.parse_args(argv)
    try:
        check_ema_decay(args.ema_decay)
    except ValueError as exc:
        parser.error(f"--ema-decay: {exc}")
    device = resolve_device(args.device)
    print("\n".join(machine_lines(machine_info([device]))))
    ema = f", moving average of the weights (decay {args.ema_decay})" if args.ema_decay else ""
    print(f"- device {device}, {args.iters} timed steps after {args.warmup} warm-up steps{ema}\n")
    runs = []
    if args.only in (None, "demo"):
        demo = load_config(os.path.join(ROOT, "configs", "shapes.yaml"))
        size = max(demo.data.train_scales)
        runs.append(("demo  configs/shapes.yaml", demo, demo.train.batch_size, size, size))
    if args.only in (None, "coco"):
        runs.append(("coco  configs/coco.yaml", load_config(os.path.join(ROOT, "configs", "coco.yaml")), 2, 800, 1066))
    for name, cfg, batch_size, height, width in runs:
        rate, ema_ms = benchmark(cfg, batch_size, height, width, args)
        seconds = batch_size / rate
        line = f"{name}: batch {batch_size} at {height}x{width}: {rate:.3g} images/s ({seconds:.3g} s/iteration)"
        if ema_ms is not None:
            line += f", of which the moving average's update {ema_ms:.3g} ms ({ema_ms / 1e3 / seconds:.1%})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
