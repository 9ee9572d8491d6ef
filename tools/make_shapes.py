#!/usr/bin/env python
"""Generate the synthetic shapes data set (COCO layout) that ``configs/shapes.yaml`` trains on.

    python tools/make_shapes.py [CONFIG] [section.key=value ...] [--force]

Writes ``data.root`` with ``data.synthetic_*`` from the config (default ``configs/shapes.yaml``), and a
``.deformable-synthetic`` marker file. Training does this by itself when ``data.synthetic: shapes`` and
``data.root`` is missing. ``--force`` regenerates a folder that this tool generated (it has the marker); a folder
without the marker is never written into.
"""

from __future__ import annotations

import argparse
import os
import sys

from deformable.data import make_shapes_from_config
from models.config import ConfigError, load_config
from models.loading import split_config_args, tool_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: configs/ beside tools/
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "shapes.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] [section.key=value]",
        help="the YAML config (default: configs/shapes.yaml), then overrides, e.g. data.root=data/shapes "
        "data.synthetic_train_images=500",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate data.root if this tool generated it")
    args = parser.parse_intermixed_args(argv)
    try:
        config, overrides = split_config_args(args.args)
        data = load_config(config or DEFAULT_CONFIG, overrides).data
        make_shapes_from_config(data, seed=args.seed, replace=args.force)
    except (ConfigError, FileNotFoundError, FileExistsError) as exc:
        return tool_error(exc)
    print(f"wrote {data.synthetic_train_images} + {data.synthetic_val_images} images to {data.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
