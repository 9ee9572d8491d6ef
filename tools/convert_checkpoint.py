#!/usr/bin/env python
"""Convert Deformable DETR weights: any checkpoint format into this project's, or into a transformers folder.

    python tools/convert_checkpoint.py SRC DST [CONFIG] [section.key=value ...]            # -> this project's .pth
    python tools/convert_checkpoint.py SRC DST --to hf [CONFIG] [section.key=value ...]    # -> transformers folder

SRC may be this project's checkpoint, an original Deformable-DETR .pth (with its ``args``), a bare state_dict, or a
transformers Deformable DETR folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``). The model
options come from CONFIG when given, else from SRC itself; the weights are loaded strictly into that detector before
anything is written, and DST is written atomically. ``--to hf`` writes ``config.json`` + ``model.safetensors``, which
``transformers.DeformableDetrForObjectDetection.from_pretrained(DST)`` loads with the same outputs, and
``preprocessor_config.json`` with the inference resize (``data.val_size`` / ``data.val_max_size``), which a folder
converted back (or a hub snapshot) gives again.

DST is checked before SRC is read: it may not be SRC (a converted checkpoint keeps no optimizer, schedule or epoch),
and an existing file, or a folder holding a transformers model, is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys

from models.config import ConfigError
from models.convert import TARGETS, convert_checkpoint
from models.loading import CONFIG_HELP, split_command_line, tool_error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the checkpoint to convert (file, transformers folder or hub model id)")
    parser.add_argument("destination", help="the .pth file (--to project) or folder (--to hf) to write")
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [section.key=value]", help=CONFIG_HELP)
    parser.add_argument("--to", choices=TARGETS, default="project", help="the format to write (default: project)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DST file (--to project) or the transformers files in DST (--to hf); never SRC",
    )
    args = parser.parse_intermixed_args(argv)
    config, overrides, rest = split_command_line(args.args)
    if rest:
        parser.error(f"unexpected arguments {' '.join(rest)} (a config must end in .yaml and come first)")
    try:
        print(convert_checkpoint(args.source, args.destination, args.to, config, overrides, args.overwrite))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        return tool_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
