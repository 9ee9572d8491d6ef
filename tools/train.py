#!/usr/bin/env python
"""Train Deformable DETR.

    python tools/train.py CONFIG [section.key=value ...]
    torchrun --nproc_per_node=N tools/train.py CONFIG [section.key=value ...]

The resolved config is written to ``output_dir/config.yaml``; checkpoints and ``log.jsonl`` go beside it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from models.config import ConfigError, load_config  # noqa: E402
from training.checkpoint import CheckpointError  # noqa: E402
from training.data import DatasetError  # noqa: E402
from training.engine import fit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2 output_dir=runs/x")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        parser.error(str(exc))
    try:
        fit(cfg)
    except (DatasetError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
