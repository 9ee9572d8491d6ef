#!/usr/bin/env python
"""Evaluate a checkpoint on the validation split with the 12 standard COCO metrics.

    python tools/eval.py [CONFIG] --checkpoint PATH [section.key=value ...]
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

from deformable.data import DatasetError
from deformable.training.engine import evaluate_checkpoint
from models import config_from_checkpoint, load_config, read_checkpoint
from models.checkpoint import CheckpointError
from models.config import ConfigError
from models.loading import CHECKPOINT_HELP, CONFIG_HELP, split_config_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value]", help=CONFIG_HELP)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    args = parser.parse_intermixed_args(argv)
    try:
        config, overrides = split_config_args(args.args)
        cfg = load_config(config, overrides) if config is not None else None
    except (ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    try:
        checkpoint = read_checkpoint(args.checkpoint)
        evaluate_checkpoint(cfg or config_from_checkpoint(checkpoint, overrides), checkpoint)
    except (DatasetError, CheckpointError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
