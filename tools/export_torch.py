#!/usr/bin/env python
"""Export a trained Deformable DETR with torch.export (the native op), with dynamic batch and image size.

    python tools/export_torch.py CONFIG --checkpoint PATH --out model.pt2 [section.key=value ...]

Writes a ``torch.export.save`` archive of ``images (B, 3, H, W) -> (pred_logits, pred_boxes)`` (normalised, unpadded
images; no mask), loads it back and compares it with the eager model at another size and batch. The graph calls
``torch.ops.deformable.ms_deform_attn``: run ``import deformable`` before ``torch.export.load`` so that the op is
registered. Without ``--checkpoint`` the weights are random (for testing the pipeline).

``--out`` and ``--size`` are checked before the export: ``--out`` must name a file (not a folder) in a folder that can
be created and written; each side of ``--size`` must be at least the model's smallest (every feature level >= 2 px:
on a ResNet 65 px with 4 levels, 33 with 3; a two-stage model also needs as many encoder positions as queries: 113 px
for 300 queries with 4 ResNet levels; measured from the backbone: ``models.deploy.min_export_side``). The file is
written atomically. The exit status is 1 when the loaded program and eager differ by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from models.config import ConfigError
from models.deploy import (
    ExportableDetector,
    check_export_size,
    check_export_torch,
    example_images,
    export_program,
    export_size_reason,
    input_ranges,
    load_for_export,
)
from models.files import atomic_write, check_file_target, make_dir
from models.loading import CHECKPOINT_HELP, CONFIG_HELP, config_and_checkpoint, split_config_args, tool_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value]", help=CONFIG_HELP)
    parser.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="the .pt2 file to write")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(512, 640), metavar=("H", "W"), help="example image size to trace with"
    )
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted loaded program vs eager difference")
    args = parser.parse_intermixed_args(argv)
    height, width = args.size
    try:
        check_export_torch()
        out = check_file_target(args.out, "--out")  # a folder or a path under a file: said now, not after the export
        config, overrides = split_config_args(args.args)
        model = load_for_export(*config_and_checkpoint(config, overrides, args.checkpoint))
        check_export_size(height, width, model)  # 1-px levels, or fewer positions than two-stage queries
        make_dir(os.path.dirname(out), "--out's folder")  # before the export's minutes
    except (ConfigError, FileNotFoundError, ValueError, TypeError) as exc:
        return tool_error(exc)
    start = time.perf_counter()
    program = export_program(model, example_images(2, height, width))
    ranges = input_ranges(program)
    if not {"height", "width"} <= ranges.keys():  # check_export_size keeps them dynamic; never save one that is not
        return tool_error(f"the exported program fixed the image size ({ranges}); nothing written")
    try:
        atomic_write(out, lambda f: torch.export.save(program, f))  # a failed write leaves no torn file
    except OSError as exc:  # a full disk, a file system that refuses the temporary file
        return tool_error(f"--out {args.out} could not be written: {exc}")
    loaded = torch.export.load(out)
    shown = ", ".join(f"{name} {lo}..{hi}" for name, (lo, hi) in input_ranges(loaded).items())
    reason = export_size_reason(model)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s; accepted sizes: {shown} ({reason})")

    images = example_images(1, height + 32, width + 64, seed=1)  # another batch and size than traced
    with torch.no_grad():
        got = loaded.module()(images)
        expected = ExportableDetector(model)(images)
    pairs = zip(("pred_logits", "pred_boxes"), got, expected, strict=True)
    diffs = {name: float((g - e).abs().max()) for name, g, e in pairs}
    shown = ", ".join(f"{name} {d:.2e}" for name, d in diffs.items())
    print(f"loaded program vs eager, images {tuple(images.shape)}: max |difference| {shown}")
    if not max(diffs.values()) <= args.atol:  # NaN fails too
        return tool_error(f"the loaded program and eager differ by more than --atol {args.atol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
