#!/usr/bin/env python
"""Evaluate a checkpoint on the validation split with the 12 standard COCO metrics.

    python tools/eval.py CONFIG --checkpoint PATH [section.key=value ...]
    torchrun --nproc_per_node=N tools/eval.py CONFIG --checkpoint PATH [section.key=value ...]

Writes ``output_dir/eval.json`` (the metrics) and ``output_dir/detections_<val_split>.json`` (COCO results format:
category ids, boxes [x, y, w, h] in original image pixels, scores).
"""

from __future__ import annotations

import argparse
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, spinning threads wait
# for cores those processes hold and make two threads several times slower than one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from models.config import ConfigError, load_config  # noqa: E402
from training.checkpoint import CheckpointError  # noqa: E402
from training.data import DatasetError  # noqa: E402
from training.engine import evaluate_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the YAML config the checkpoint was trained with")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by tools/train.py")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.root=/path output_dir=runs/x")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    try:
        evaluate_checkpoint(cfg, args.checkpoint)
    except (DatasetError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
