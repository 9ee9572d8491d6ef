#!/usr/bin/env python
"""Detect objects in images or folders of images with a trained Deformable DETR.

    python tools/infer.py [CONFIG] --checkpoint PATH INPUT... [--out DIR] [options] [section.key=value ...]

INPUT: image or video files, folders (their images and videos, hidden files left out) or quoted glob patterns
("photos/*.jpg").
Writes DIR/<image>.jpg with the detections drawn (DIR/<image>.png, with a warning, for an image with a side longer
than JPEG's 65500 pixels), DIR/results.json (COCO results format: image_id, category_id, bbox [x, y, w, h] in
original pixels, score) and DIR/images.json (id, file_name, height, width of each image, and drawn: the name of its
drawing in DIR, <image>_1.jpg, ... where names repeat). An image of the data set of the config keeps its id there,
so results.json can be scored against it; any other image gets an id above the data set's largest. The boxes drawn
are those of results.json. Class names come from the checkpoint or the data set of its saved config (or CONFIG) when
its annotation file is found, else numeric ids are shown.

Nothing you saved is replaced: DIR may not be a folder that holds an input (choose another --out), and an existing
file of DIR is replaced or removed only if an earlier run of infer wrote it (DIR/.infer-outputs.json lists them), so
rerunning into the same DIR updates it: once a run has written all, what an earlier run wrote and this one did not
is removed (a run that fails removes nothing). An image or video that cannot be read is skipped with a warning naming
it, listed at the end, and the others are processed (exit status 0); the run fails only when no input can be read.
A video (.mp4, .avi, .mov, .mkv, .webm, ...) gives DIR/<video>.mp4, its frames with the detections drawn, and
DIR/<video>.json: frame rate, size, drawn (the drawn video's name, null where none could be written) and, per frame,
its index, time and detections (category_id, name, bbox [x, y, w, h] in pixels, score); --video-stride N detects on
every N-th frame only (the drawn video then plays at 1/N of the rate).
--batch-size 1 (the default, as for Predictor) detects on each image alone; a larger batch is faster on a GPU but
pads the smaller images of a batch to the largest, which may change their detections slightly (as in the original).
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from deformable.data.sizes import inference_config
from deformable.inference import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ImageError, list_images, resolve_device
from deformable.inference.predictor import DEFAULT_BATCH_SIZE, check_count, check_threshold
from deformable.inference.run import run_inference
from deformable.inference.video import is_video
from deformable.viz.detections import draw_detections
from models.config import ConfigError
from models.loading import CHECKPOINT_HELP, split_command_line, tool_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="[CONFIG] images, folders of images, section.key=value overrides")
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    parser.add_argument(
        "--out", default="detections", help="output folder, not one that holds an input (default: detections)"
    )
    parser.add_argument("--score-threshold", type=float, default=0.3, help="lowest score kept, in [0, 1] (0.3)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"images per forward pass ({DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument("--video-stride", type=int, default=1, help="detect on every N-th frame of a video (1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index> (auto: a GPU if one is seen)")
    args = parser.parse_intermixed_args(argv)
    try:  # the numbers first: a typo should not wait for the checkpoint to load
        check_threshold(args.score_threshold, "--score-threshold")
        check_count(args.batch_size, "--batch-size")
        check_count(args.video_stride, "--video-stride")
    except ValueError as exc:
        parser.error(str(exc))
    config, overrides, inputs = split_command_line(args.inputs)

    def warn(message: str) -> None:
        tqdm.write(f"warning: {message}", file=sys.stderr)  # above the progress bar, not through it

    try:
        device = resolve_device(args.device, option="--device")
        cfg, checkpoint = inference_config(config, overrides, args.checkpoint)
        paths = list_images(inputs, IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        kwargs = dict(score_threshold=args.score_threshold, batch_size=args.batch_size, draw=draw_detections)
        kwargs.update(video_stride=args.video_stride)
        run = run_inference(cfg, checkpoint, paths, args.out, device=device, warn=warn, **kwargs)
    except (ConfigError, FileNotFoundError, ImageError, ValueError) as exc:
        return tool_error(exc)
    parts = [f"{len(run.results)} detections in {len(run.images)} images"] if run.images or not run.videos else []
    parts += [f"{len(run.videos)} video(s) (<video>.mp4, <video>.json)"] if run.videos else []
    removed = f"; {len(run.removed)} file(s) an earlier run wrote there removed" if run.removed else ""
    print(f"{' and '.join(parts)} written to {args.out}{removed}")
    if run.skipped:
        kinds = {"video" if is_video(path) else "image" for path in run.skipped}
        kind = kinds.pop() if len(kinds) == 1 else "input"
        listed = "\n".join(f"  {path}" for path in run.skipped)
        print(f"warning: {len(run.skipped)} unreadable {kind}(s) skipped (reasons above):\n{listed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
