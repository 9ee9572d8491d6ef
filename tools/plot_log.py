#!/usr/bin/env python
"""Plot the training curves of a run: losses, learning rate and COCO AP against the epoch.

    python tools/plot_log.py RUN_DIR/log.jsonl --out curves.png

Reads the log.jsonl that tools/train.py writes (one JSON object per epoch); draws with matplotlib, into any format
it writes (.png, .pdf, .svg, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

from deformable.training.run_log import LOG_NAME
from deformable.viz.curves import LogError, check_figure_path, plot_curves, read_log, save_figure
from models.files import FolderError
from models.loading import tool_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="log.jsonl written by tools/train.py (or its run folder)")
    parser.add_argument(
        "--out", default="curves.png", help="output image; format from the extension (default: curves.png)"
    )
    args = parser.parse_args(argv)
    try:
        check_figure_path(args.out)  # before the log is read: a typo in --out is named at once
    except LogError as exc:
        parser.error(str(exc))
    path = os.path.join(args.log, LOG_NAME) if os.path.isdir(args.log) else args.log
    try:
        save_figure(args.out, plot_curves(read_log(path), source=path))
    except (LogError, FolderError, OSError) as exc:
        return tool_error(exc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
