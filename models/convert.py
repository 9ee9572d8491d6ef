"""Converting weights between the formats :func:`models.read_checkpoint` reads: any of them into this project's
checkpoint, or into a Hugging Face transformers folder that ``DeformableDetrForObjectDetection.from_pretrained``
loads."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .checkpoint import save_checkpoint
from .config import config_to_dict
from .loading import config_and_checkpoint, load_detector

TARGETS = ("project", "hf")


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    to: str = "project",
    config: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
) -> str:
    """Reads ``source`` (any format), loads it strictly into the detector its config describes (``config`` with
    ``overrides``, or the checkpoint's own), and writes it to ``destination``:

    - ``to="project"``: ``{model, config, class_names, source}``, which every tool and ``train.finetune`` read
      with the config inside;
    - ``to="hf"``: a folder with ``config.json`` and ``model.safetensors`` (class names as ``id2label``).

    Returns a one-line summary. Raises ``ValueError`` (an unknown target, or a checkpoint that does not fit its
    config: the options and their overrides named) and ``FileNotFoundError``.
    """
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    cfg, checkpoint = config_and_checkpoint(config, overrides, source)
    model, checkpoint = load_detector(cfg, checkpoint)
    state = model.state_dict()
    if to == "hf":
        from .hf_format import write_hf

        write_hf(destination, state, cfg.model, checkpoint.class_names)
    else:
        content = {
            "model": state,
            "config": config_to_dict(cfg),
            "class_names": dict(checkpoint.class_names),
            "source": {"path": os.fspath(source), "format": checkpoint.format},
        }
        save_checkpoint(content, destination)
    names = f"{len(checkpoint.class_names)} class names" if checkpoint.class_names else "no class names"
    return (
        f"{source} ({checkpoint.format} format, {len(state)} tensors, {cfg.model.num_classes} classes, {names}) "
        f"-> {destination} ({to} format)"
    )
