#!/usr/bin/env python
r"""Train Deformable DETR.

    python tools/train.py CONFIG [section.key=value ...]
    torchrun --nproc_per_node=N tools/train.py CONFIG [section.key=value ...]
    torchrun --nnodes=M --nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=JOB \
        tools/train.py CONFIG [section.key=value ...]       # the same command on every node

The resolved config is written to ``output_dir/config.yaml``; checkpoints (``checkpoint.pth``, the latest) and
``log.jsonl`` go beside it. ``train.resume=auto`` continues from the latest checkpoint there (Ctrl-C stops a run
with exit status 130, and says so); with several nodes, ``output_dir`` must be on a file system every node mounts.
"""

from __future__ import annotations

import argparse
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, spinning threads wait
# for cores those processes hold and make two threads several times slower than one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from deformable.data import DatasetError, error_message
from deformable.training.engine import fit
from deformable.training.stops import interrupted
from models.checkpoint import CheckpointError
from models.config import ConfigError, load_config
from models.files import FolderError
from models.loading import tool_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/shapes.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2 output_dir=runs/x")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        return tool_error(exc)
    try:
        fit(cfg)
    except (DatasetError, CheckpointError, ConfigError, FolderError, FileNotFoundError, FloatingPointError) as exc:
        return tool_error(error_message(exc))  # a DataLoader worker's error: its own message
    except KeyboardInterrupt:  # Ctrl-C reaches every process under torchrun: one of them says so
        if os.environ.get("RANK", "0") == "0":
            print(interrupted(cfg.output_dir), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
