#!/usr/bin/env python
"""Export a trained Deformable DETR to ONNX, with dynamic batch and image size, and check it with onnxruntime.

    python tools/export_onnx.py CONFIG --checkpoint PATH --out model.onnx [--opset 18] [section.key=value ...]

The model takes ``images (batch, 3, height, width)``, float32, normalised (ImageNet mean/std) and unpadded (there
is no mask input), and returns ``pred_logits (batch, Q, num_classes)`` and ``pred_boxes (batch, Q, 4)`` (cx, cy, w,
h in [0, 1]). The deformable attention goes through its pure-PyTorch path (``deformable.backend("pytorch")``),
which becomes ONNX GridSample. The file is checked with ``onnx.checker``; when onnxruntime is installed its outputs
are compared with PyTorch's (native op) at the export size and at another size and batch, and the tool fails when
they differ by more than ``--atol``. Without ``--checkpoint`` the weights are random (for testing the pipeline).

``--out`` and ``--size`` are checked before the export: ``--out`` must name a file (not a folder) in a folder that can
be created and written; each side of ``--size`` must be at least the model's smallest (every feature level >= 2 px:
on a ResNet 65 px with 4 levels, 33 with 3; a two-stage model also needs as many encoder positions as queries: 113 px
for 300 queries with 4 ResNet levels; measured from the backbone: ``models.deploy.min_export_side``). The file is
written atomically.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import deformable
from models.config import ConfigError
from models.deploy import (
    DEFAULT_OPSET,
    check_export_size,
    check_export_torch,
    check_onnx,
    check_opset,
    converter_max,
    example_images,
    export_onnx,
    export_size_reason,
    has_cope,
    load_for_export,
    min_export_side,
    onnx_max_difference,
    onnx_session,
)
from models.files import check_file_target, make_dir
from models.loading import CHECKPOINT_HELP, CONFIG_HELP, config_and_checkpoint, split_config_args, tool_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value]", help=CONFIG_HELP)
    parser.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, 18..{converter_max()} (default {DEFAULT_OPSET})"
    )
    parser.add_argument(
        "--size", type=int, nargs=2, default=(512, 640), metavar=("H", "W"), help="example image size to trace with"
    )
    parser.add_argument("--atol", type=float, default=1e-3, help="largest accepted onnxruntime vs PyTorch difference")
    args = parser.parse_intermixed_args(argv)
    try:
        check_opset(args.opset)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def verify(path: str, model, height: int, width: int, atol: float) -> bool:
    """Compares onnxruntime with PyTorch at the export size (batch 2) and at a larger size (batch 1); a model with
    CoPE offsets with PyTorch on the exported (pure-PyTorch) path: where gates are nearly closed, a count moves a
    point far, so two paths' rounding differences would show as large ones."""
    if importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime is not installed: outputs not compared (pip install '.[export]')")
        return True
    session = onnx_session(path)
    reference = "pytorch" if has_cope(model) else "native"  # the attention path PyTorch's outputs come from
    ok = True
    for batch, h, w in ((2, height, width), (1, height + 32, width + 64)):
        with deformable.backend(reference):
            diffs = onnx_max_difference(session, model, example_images(batch, h, w, seed=1))
        worst = max(diffs.values())
        ok &= worst <= atol
        shown = ", ".join(f"{name} {d:.2e}" for name, d in diffs.items())
        print(f"onnxruntime vs PyTorch, images ({batch}, 3, {h}, {w}): max |difference| {shown}")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    height, width = args.size
    try:
        check_export_torch()
        out = check_file_target(args.out, "--out")  # a folder or a path under a file: said now, not after the export
        config, overrides = split_config_args(args.args)
        cfg, checkpoint = config_and_checkpoint(config, overrides, args.checkpoint)
        model = load_for_export(cfg, checkpoint)
        check_export_size(height, width, model)  # 1-px levels, or fewer positions than two-stage queries
        make_dir(os.path.dirname(out), "--out's folder")  # before the export's minutes
    except (ConfigError, FileNotFoundError, ValueError, TypeError) as exc:
        return tool_error(exc)
    start = time.perf_counter()
    try:
        export_onnx(model, args.out, example_images(2, height, width), opset=args.opset)
    except (ImportError, ValueError) as exc:
        return tool_error(exc)
    except OSError as exc:  # a full disk, a file system that refuses the temporary folder
        return tool_error(f"--out {args.out} could not be written: {exc}")
    check_onnx(args.out)
    size_mb = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({size_mb:.1f} MB, opset {args.opset}) in {time.perf_counter() - start:.0f} s")
    print("onnx.checker: ok")
    # The graph has no check of its own: onnxruntime fails below it (a two-stage model's TopK) or is untested there.
    side = min_export_side(model)
    print(f"accepted sizes: batch 1..inf, height {side}..inf, width {side}..inf ({export_size_reason(model)})")
    if not verify(args.out, model, height, width, args.atol):
        return tool_error(f"onnxruntime and PyTorch differ by more than --atol {args.atol}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
