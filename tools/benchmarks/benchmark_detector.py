"""Benchmarks Deformable DETR (R50 multi-scale by default): a training step and inference, per device and per
multi-scale deformable attention backend, with the time share of backbone, encoder, decoder and loss.

    python tools/benchmarks/benchmark_detector.py --iters 10 --threads 8
    python tools/benchmarks/benchmark_detector.py --devices cuda --backends native,pytorch
    python tools/benchmarks/benchmark_detector.py --devices cuda --backends native,pytorch,transformers \\
        --amp none,bf16 --train-shape 2x800x1333 --infer-shapes 1x800x1333 --no-shares --json detector.json

Backends: "native" is the compiled op (the PyTorch path when the extension or its kernel for the device is missing;
the table says so), "pytorch" sets ``DEFORMABLE_BACKEND=pytorch``, which the op reads on every call. "transformers"
is transformers' ``DeformableDetrForObjectDetection`` built from the same config with random weights: a timm ResNet
of the same name without pretrained weights (``use_timm_backbone=True, use_pretrained_backbone=False``), the same
levels, layers, widths, heads, points, queries, classes, dropout and auxiliary loss, its loss computed inside its
forward from the same targets. Its stem and layer1 are frozen as ours are (transformers 5 leaves them trainable with
a timm backbone, which would add work ours does not do). Its loss weights and matcher costs stay transformers'
defaults (they change no work). It runs its own PyTorch path of the op unless its ``kernels`` hub integration finds a
kernel (the table's label says "transformers" either way; without network access there is none).

Precision: ``--amp bf16`` (or fp16) runs each forward under ``torch.autocast``; ours then computes the loss on float32
outputs, as ``deformable.training.engine`` does (its ``autocast`` and ``to_float``), transformers its whole forward
(loss included) under autocast. The table's phase says "train bf16" for such rows.

The total is timed without instrumentation: the mean time per step of the timed steps, each step timed on its own by
``deformable.benchmarking.time_calls`` (wall time on a CPU, CUDA events on a GPU). The shares come from a second,
instrumented run (skipped with --no-shares): forward and backward hooks on the backbone (with position encoding), the
encoder and the decoder synchronise the device and time each module's forward and backward; "loss" is our criterion's
forward (matching included; inside "other" for transformers); "other" is the rest (input projections, heads, query
preparation, the loss backward, the optimiser step). transformers' training rows have no shares: its modules return
output objects, and backward hooks see only tensors and tuples of them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from deformable import _extension
from deformable.benchmarking import machine_info, machine_lines, set_threads, synchronize, time_calls
from deformable.training.engine import AMP_DTYPES, autocast, to_float
from models import build_criterion, build_detector, load_config
from models.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: configs/
PARTS = ("backbone", "encoder", "decoder", "loss")
Shape = tuple[int, int, int]  # (batch, height, width)


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
        synchronize(self.device)
        self._start[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        synchronize(self.device)
        self.seconds[name] += time.perf_counter() - self._start.pop(name)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _targets(batch: int, num_classes: int, device: torch.device, generator: torch.Generator) -> list[dict]:
    """Six random boxes per image, labels in ``[1, num_classes)`` (category ids, the original's convention)."""
    targets = []
    for _ in range(batch):
        centre = torch.rand(6, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(6, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(1, num_classes, (6,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centre, size], -1).to(device)})
    return targets


def build_transformers_detector(cfg: Config) -> nn.Module:
    """transformers' ``DeformableDetrForObjectDetection`` with ``cfg.model``'s sizes and random weights (docstring)."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    from models.hf_format import hf_config

    # The same mapping write_hf uses for config.json; transformers' own loss weights and matcher costs stay.
    config = DeformableDetrConfig.from_dict({**hf_config(cfg.model, None), "focal_alpha": cfg.loss.focal_alpha})
    model = DeformableDetrForObjectDetection(config)
    for name, parameter in model.model.backbone.named_parameters():
        if not any(layer in name for layer in ("layer2", "layer3", "layer4")) or not cfg.model.train_backbone:
            parameter.requires_grad_(False)
    return model


def _parts(model: nn.Module, backend: str) -> dict[str, nn.Module]:
    """The modules whose forward and backward the instrumented run times."""
    if backend == "transformers":
        inner = model.model
        return {"backbone": inner.backbone, "encoder": inner.encoder, "decoder": inner.decoder}
    return {"backbone": model.backbone, "encoder": model.transformer.encoder, "decoder": model.transformer.decoder}


def make_step(
    model: nn.Module, criterion: nn.Module, backend: str, phase: str, images: torch.Tensor, targets: list[dict],
    amp: str,
) -> Callable[[PartTimer | None], None]:  # fmt: skip
    """One training step (forward, loss, backward, AdamW step) or one inference forward, as a closure."""
    device = images.device
    if phase == "infer":
        model.eval()

        def infer(timer: PartTimer | None = None) -> None:
            with torch.no_grad(), autocast(amp, device):
                if backend == "transformers":
                    model(pixel_values=images)
                else:
                    model(images)

        return infer
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def train(timer: PartTimer | None = None) -> None:
        if backend == "transformers":
            with autocast(amp, device):
                loss = model(pixel_values=images, labels=labels).loss
        else:
            with autocast(amp, device):
                outputs = model(images)
            if timer:
                timer.start("loss")
            loss = criterion(to_float(outputs), targets)["loss"]
            if timer:
                timer.stop("loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train


def _run(step: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call of ``step`` over ``iters`` timed calls after ``warmup`` calls."""
    return time_calls(step, device=device, iters=iters, warmup=warmup).mean_ms / 1e3


def benchmark(
    model: nn.Module, criterion: nn.Module, backend: str, phase: str, shape: Shape, amp: str, num_classes: int,
    args: argparse.Namespace, device: torch.device,
) -> dict:  # fmt: skip
    """Times one phase ("train" or "infer") on random ``(B, H, W)`` images; returns total ms and shares."""
    batch, height, width = shape
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator).to(device)
    targets = _targets(batch, num_classes, device, generator)
    step = make_step(model, criterion, backend, phase, images, targets, amp)
    total = _run(step, args.iters, args.warmup, device)
    if not args.shares or (backend == "transformers" and phase == "train"):
        return {"ms": total * 1e3, "shares": None}
    timer = PartTimer(_parts(model, backend), device)
    if phase == "train":
        images.requires_grad_(True)  # so that the backbone's backward hook fires after its backward, not before
    instrumented = _run(lambda: step(timer), args.iters, 0, device)
    timer.remove()
    images.requires_grad_(False)
    shares = {part: timer.seconds[part] / args.iters / instrumented for part in PARTS if part in timer.seconds}
    return {"ms": total * 1e3, "shares": shares}


def _backend_label(backend: str, device: torch.device) -> str:
    if backend in ("pytorch", "transformers"):
        return backend
    if _extension.extension_loaded() and _extension.native_supports(device.type):
        return "native"
    return "native (unavailable: PyTorch path)"


def _set_backend(backend: str) -> None:
    if backend == "pytorch":
        os.environ["DEFORMABLE_BACKEND"] = "pytorch"
    else:
        os.environ.pop("DEFORMABLE_BACKEND", None)


def _row(record: dict) -> str:
    if record["shares"] is None:
        cells = ["-"] * (len(PARTS) + 1)
    else:
        shares = [record["shares"].get(p) for p in PARTS]
        other = 1 - sum(s for s in shares if s is not None)
        cells = [f"{100 * s:.0f}%" if s is not None else "-" for s in shares] + [f"{100 * other:.0f}%"]
    size = "x".join(map(str, (record["batch"], record["height"], record["width"])))
    phase = record["phase"] if record["amp"] == "none" else f"{record['phase']} {record['amp']}"
    cells = [record["device"], record["label"], phase, size, f"{record['ms']:.1f}", *cells]
    return "| " + " | ".join(cells) + " |"


def _parse_shape(text: str) -> Shape:
    """``"2x800x1333"`` -> ``(2, 800, 1333)``."""
    try:
        batch, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxHEIGHTxWIDTH, e.g. 2x800x1333, got {text!r}") from None
    return batch, height, width


def _cases(args: argparse.Namespace) -> list[tuple[str, Shape]]:
    cases = [("train", args.train_shape)] if "train" in args.phases else []
    return cases + ([("infer", s) for s in args.infer_shapes] if "infer" in args.phases else [])


def _models(cfg: Config, backends: list[str], device: torch.device) -> dict[str, tuple[nn.Module, nn.Module]]:
    """(model, criterion) per kind: "ours" for native and pytorch, "transformers" when asked for and importable."""
    torch.manual_seed(0)
    models = {}
    if any(b != "transformers" for b in backends):
        models["ours"] = (build_detector(cfg).to(device), build_criterion(cfg))
    if "transformers" in backends:
        try:
            models["transformers"] = (build_transformers_detector(cfg).to(device), nn.Identity())
        except ImportError as exc:
            print(f"note: transformers is not importable ({exc}): its rows are left out")
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="coco.yaml", help="a config file, or the name of one in configs/ (default: coco.yaml)"
    )
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="native,pytorch", help="comma-separated: native, pytorch, transformers")
    parser.add_argument("--phases", default="train,infer")
    parser.add_argument("--amp", default="none", help="comma-separated: none, bf16, fp16 (default none)")
    parser.add_argument("--train-shape", type=_parse_shape, default=(2, 512, 512), help="BxHxW (default 2x512x512)")
    parser.add_argument(
        "--infer-shapes", type=lambda t: [_parse_shape(s) for s in t.split(",")],
        default=[(1, 800, 1333), (1, 512, 683)], help="comma-separated BxHxW (default 1x800x1333,1x512x683)",
    )  # fmt: skip
    parser.add_argument("--no-shares", dest="shares", action="store_false", help="skip the instrumented run")
    parser.add_argument("--json", metavar="PATH", help="also write every row to this JSON file")
    args = parser.parse_args(argv)
    if bad := set(args.amp.split(",")) - {"none", *AMP_DTYPES}:
        parser.error(f"--amp: unknown {sorted(bad)}; choose from none, bf16, fp16")
    if bad := set(args.backends.split(",")) - {"native", "pytorch", "transformers"}:
        parser.error(f"--backends: unknown {sorted(bad)}; choose from native, pytorch, transformers")
    return args


def _config_path(name: str) -> str:
    """``name`` as given when it is a file, else the file of that name in the checkout's configs/."""
    return name if os.path.isfile(name) else os.path.join(ROOT, "configs", name)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:  # before any output: a wrong name is said at once
        cfg = load_config(_config_path(args.config), ["model.pretrained_backbone=false"])
    except (ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"error: --config {args.config}: {exc}") from None
    set_threads(args.threads)
    backends = args.backends.split(",")
    info = machine_info(args.devices.split(","))
    print("\n".join(machine_lines(info)))
    print(f"- {args.iters} timed iterations after {args.warmup} warm-up iterations, their mean\n")
    print("| device | backend | phase | batch x H x W | ms / iter | " + " | ".join(PARTS) + " | other |")
    print("|---" * (6 + len(PARTS)) + "|", flush=True)
    records = []
    for device in [torch.device(d) for d in args.devices.split(",")]:
        models = _models(cfg, backends, device)
        for backend in backends:
            kind = "transformers" if backend == "transformers" else "ours"
            if kind not in models:
                continue
            _set_backend(backend)
            for amp in args.amp.split(","):
                for phase, shape in _cases(args):
                    result = benchmark(*models[kind], backend, phase, shape, amp, cfg.model.num_classes, args, device)
                    record = {"device": device.type, "backend": backend, "label": _backend_label(backend, device),
                              "amp": amp, "phase": phase, "batch": shape[0], "height": shape[1], "width": shape[2],
                              "iters": args.iters, "warmup": args.warmup, **result}  # fmt: skip
                    print(_row(record), flush=True)
                    records.append(record)
                    if args.json:
                        with open(args.json, "w", encoding="utf-8") as f:
                            json.dump({"torch": torch.__version__, "machine": info, "records": records}, f, indent=1)
        _set_backend("native")
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
