#!/usr/bin/env python
"""Evaluate a checkpoint on the validation split with the 12 standard COCO metrics.

    python tools/eval.py [CONFIG] --checkpoint PATH [section.key=value ...]
    torchrun --nproc_per_node=N tools/eval.py CONFIG --checkpoint PATH [section.key=value ...]

Writes ``eval.json`` (the metrics) and ``detections_<val_split>.json`` (COCO results format: category ids, boxes
[x, y, w, h] in original image pixels, scores) into ``output_dir`` when it is given on the command line, else beside
the checkpoint (into the folder of a checkpoint file, or into a transformers folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other processes, spinning threads wait
# for cores those processes hold and make two threads several times slower than one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from deformable.data import DatasetError, error_message
from deformable.data.sizes import inference_config
from deformable.training.engine import evaluate_checkpoint
from models.checkpoint import CheckpointError
from models.config import ConfigError, parse_override
from models.files import FolderError
from models.hub import hub_id
from models.loading import CHECKPOINT_HELP, CONFIG_HELP, split_config_args, tool_error


def results_folder(checkpoint: str, overrides: list[str]) -> str | None:
    """Where the results go when ``output_dir`` is not among ``overrides``: beside the checkpoint (a config's or the
    checkpoint's own ``output_dir`` is the training run's, possibly another run's or another machine's), or
    ``runs/eval/OWNER--NAME[@REVISION]`` for a hub model id; else None (the override stands)."""
    if any(parse_override(o)[0] == ["output_dir"] for o in overrides):
        return None
    hub = hub_id(checkpoint)
    if hub is not None:  # not into the hub's cache; one folder per revision
        repo, revision = hub
        name = repo.replace("/", "--") + ("@" + revision.replace("/", "--") if revision else "")
        return os.path.join("runs", "eval", name)
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value]", help=CONFIG_HELP)
    parser.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    args = parser.parse_intermixed_args(argv)
    config, cfg = None, None
    try:
        config, overrides = split_config_args(args.args)
        cfg, checkpoint = inference_config(config, overrides, args.checkpoint)
        folder = results_folder(args.checkpoint, overrides)
        evaluate_checkpoint(cfg if folder is None else dataclasses.replace(cfg, output_dir=folder), checkpoint)
    except (DatasetError, CheckpointError, ConfigError, FileNotFoundError, FolderError) as exc:
        message = error_message(exc)  # a DataLoader worker's error: its own message
        if isinstance(exc, DatasetError) and config is None and cfg is not None and not os.path.exists(cfg.data.root):
            message += (
                f" (data.root={cfg.data.root} is the checkpoint's saved config's, relative to where it was trained and "
                f"not found from {os.getcwd()}: run from there, or pass data.root=PATH)"
            )
        return tool_error(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
