#!/usr/bin/env python
"""Draw where Deformable DETR looks: reference points, sampling points coloured by level (or head) with size and
opacity growing with the attention weight, and the detected boxes (the paper's figure).

    python tools/visualize.py [CONFIG] --image IMG --out OUT.png [--checkpoint PATH] [options] [section.key=value ...]

Decoder view (default): the top-k detections and the sampling points of a decoder layer's cross-attention.
Encoder view (--pixel X,Y): where the encoder query at that pixel samples. With offset_mode cope, the count
density along the reference point's row and column is drawn as strips. Without --checkpoint the weights are random.
"""

from __future__ import annotations

import argparse
import sys

import cv2

from deformable.data.sizes import inference_config
from deformable.inference import ImageError, class_names, load_detector, read_image, resolve_device
from deformable.inference.predictor import check_count, check_threshold
from deformable.viz.draw import save_image
from deformable.viz.figure import decoder_figure, encoder_figure, run_recorded
from models.config import ConfigError
from models.files import check_file_target
from models.loading import CHECKPOINT_HELP, CONFIG_HELP, split_config_args, tool_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value]", help=CONFIG_HELP)
    parser.add_argument("--image", required=True)
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--checkpoint", help=CHECKPOINT_HELP + "; omitted: random weights (debugging)")
    parser.add_argument("--layer", type=int, default=-1, help="decoder (or encoder) layer, negative from the last")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--score-threshold", type=float, default=0.3)
    parser.add_argument("--color-by", choices=("level", "head"), default="level")
    parser.add_argument("--panels", action="store_true", help="one panel per detection")
    parser.add_argument("--pixel", help="X,Y: encoder view of the query at this image pixel")
    parser.add_argument("--query-level", type=int, default=None, help="encoder view (--pixel): level of the query (0)")
    parser.add_argument("--scale", type=int, help="canvas enlargement (default: small images are enlarged)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (auto: a GPU if one is seen)")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.scale is not None:
            check_count(args.scale, "--scale")
        check_count(args.top_k, "--top-k")
        check_threshold(args.score_threshold, "--score-threshold")
    except ValueError as exc:
        parser.error(str(exc))
    if not cv2.haveImageWriter(args.out):  # before the model runs, not after
        parser.error(f"--out {args.out!r} has no image extension OpenCV writes (use .png or .jpg)")
    return args


def _pixel(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--pixel must be X,Y (two numbers), got {text!r}") from None
    return x, y


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_file_target(args.out, "--out")  # a folder, or a path under a file: said before the model runs
        config, overrides = split_config_args(args.args)
        device = resolve_device(args.device, option="--device")
        cfg, checkpoint = inference_config(config, overrides, args.checkpoint)
        pixel = _pixel(args.pixel) if args.pixel else None
        if pixel is None and args.query_level is not None:
            raise ValueError("--query-level picks the query of the encoder view: give --pixel X,Y with it")
        image = read_image(args.image)
        model, state = load_detector(cfg, checkpoint, device)
        outputs, records = run_recorded(model, image, cfg.data)
        style = dict(layer=args.layer, color_by=args.color_by, scale=args.scale)
        if pixel is not None:
            level = 0 if args.query_level is None else args.query_level
            figure = encoder_figure(model, records, image, pixel, query_level=level, **style)
        else:
            style.update(top_k=args.top_k, threshold=args.score_threshold, panels=args.panels)
            figure = decoder_figure(model, records, outputs, image, names=class_names(cfg, state), **style)
    except (ConfigError, FileNotFoundError, ImageError, ValueError) as exc:
        return tool_error(exc)
    try:
        save_image(args.out, figure)
    except OSError as exc:
        return tool_error(exc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
