#!/usr/bin/env python
"""Detect objects in images or folders of images with a trained Deformable DETR.

    python tools/infer.py [CONFIG] --checkpoint PATH INPUT... [--out DIR] [options] [section.key=value ...]

INPUT: image files, folders (their images, hidden files left out) or quoted glob patterns ("photos/*.jpg").
Writes DIR/<image>.jpg with the detections drawn, DIR/results.json (COCO results format: image_id, category_id,
bbox [x, y, w, h] in original pixels, score) and DIR/images.json (the image ids). Class names come from the data
set of the checkpoint's saved config (or CONFIG) when its annotation file is found, else numeric ids are shown.
"""

from __future__ import annotations

import argparse
import sys

from deformable.inference import ImageError, list_images, resolve_device
from deformable.inference.run import run_inference
from deformable.viz.detections import draw_detections
from models.config import ConfigError
from models.loading import CHECKPOINT_HELP, config_and_checkpoint, split_command_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="[CONFIG] images, folders of images, section.key=value overrides")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument("--out", default="detections", help="output folder (default: detections)")
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_intermixed_args(argv)
    config, overrides, inputs = split_command_line(args.inputs)
    try:
        cfg, checkpoint = config_and_checkpoint(config, overrides, args.checkpoint)
        paths = list_images(inputs)
        kwargs = dict(score_threshold=args.score_threshold, batch_size=args.batch_size)
        device = resolve_device(args.device)
        results = run_inference(cfg, checkpoint, paths, args.out, device=device, draw=draw_detections, **kwargs)
    except (ConfigError, FileNotFoundError, ImageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(results)} detections in {len(paths)} images written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
