"""Converting weights between the formats :func:`models.read_checkpoint` reads: any of them into this project's
checkpoint, or into a Hugging Face transformers folder that ``DeformableDetrForObjectDetection.from_pretrained``
loads."""

from __future__ import annotations

import os
from collections.abc import Iterable

from .checkpoint import read_checkpoint, run_folder_checkpoint, save_checkpoint
from .config import config_to_dict, load_config, override_list
from .files import FileTargetError, check_file_target, check_folder_target
from .hf_format import HF_FILES, check_hf_destination, is_hf_source, write_hf
from .hub import resolve_checkpoint
from .loading import load_detector, resolve_config

TARGETS = ("project", "hf")


def _source_paths(source: str) -> list[str]:
    """The files and folder a conversion reads from ``source``: what it may never write onto. A transformers
    folder, or weights file with its ``config.json`` beside, counts whole."""
    paths = [source, run_folder_checkpoint(source)]  # a run's folder is read as its checkpoint.pth
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    if os.path.isdir(source) or is_hf_source(source):
        paths += [folder, *(os.path.join(folder, name) for name in HF_FILES)]
    return [p for p in paths if os.path.exists(p)]


def _is_source(path: str, sources: list[str]) -> bool:
    """True when ``path`` is one of ``sources`` (the same file or folder, through links and hard links too)."""
    if not os.path.exists(path):
        return False
    return any(os.path.samefile(path, source) for source in sources)


# Names of checkpoint files, which a transformers folder (--to hf) is not given by mistake.
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def check_destination(
    source: str | os.PathLike, destination: str | os.PathLike, to: str = "project", overwrite: bool = False
) -> None:
    """Checks before anything is read that ``destination`` can receive the conversion of ``source``.

    Raises:
        ValueError: an unknown target.
        FileNotFoundError: no such ``source``.
        FileTargetError (a ValueError): ``destination`` is empty, a folder (``--to project``, which writes a file)
            or a file (``--to hf``, which writes a folder), lies under a file, is not writable, is (part of) the
            source, or exists (``--to project``) or holds a transformers model (``--to hf``) and ``overwrite`` is
            False.
    """
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    source, destination = os.fspath(source), os.fspath(destination)
    if not os.path.exists(source):
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    sources = _source_paths(source)
    if to == "hf":
        if destination.lower().endswith(FILE_SUFFIXES) and not os.path.exists(destination):
            raise FileTargetError(
                f"destination {destination} is named like a file, but --to hf writes a folder (config.json, "
                "model.safetensors, preprocessor_config.json): name a folder, or drop --to hf for a project checkpoint"
            )
        folder = check_folder_target(destination, "the transformers folder")  # its files are judged below
        written = [folder, *(os.path.join(folder, name) for name in HF_FILES)]
        if any(_is_source(path, sources) for path in written):
            raise FileTargetError(
                f"destination {destination} is the source's folder: converting into it would replace the "
                f"weights being converted; name another folder"
            )
        check_hf_destination(destination, overwrite)
        return
    check_file_target(destination, "destination")
    if _is_source(destination, sources):
        raise FileTargetError(
            f"destination {destination} is the source {source}: converting onto it would replace it (and lose "
            f"what the conversion drops: optimizer, lr_scheduler, epoch...); name another file"
        )
    if destination.lower().endswith(".safetensors"):  # a project checkpoint holds its config and names: a pickle
        raise FileTargetError(
            f"destination {destination}: a project checkpoint is a torch file with its config and class names, which "
            "safetensors cannot hold; name it .pth, or write a transformers folder (its weights in model.safetensors) "
            "with --to hf"
        )
    if os.path.lexists(destination) and not overwrite:
        raise FileTargetError(
            f"destination {destination} exists: not replaced (--overwrite, or overwrite=True, replaces it)"
        )


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    to: str = "project",
    config: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
) -> str:
    """Reads ``source`` (any format), loads it strictly into the detector its config describes (``config`` with
    ``overrides``, or the checkpoint's own), and writes it to ``destination``:

    - ``to="project"``: ``{model, config, class_names, source}``, which every tool and ``train.finetune`` read
      with the config inside;
    - ``to="hf"``: a folder with ``config.json``, ``model.safetensors`` (class names as ``id2label``) and
      ``preprocessor_config.json`` (the inference resize, ``data.val_size`` / ``data.val_max_size``).

    The inference resize travels both ways: a transformers folder's ``preprocessor_config.json`` sets
    ``data.val_size`` / ``data.val_max_size`` when no ``config`` file is given (``overrides`` still win:
    :func:`models.loading.config_from_checkpoint`), so a project checkpoint converted to a folder and back resizes
    its images as before.

    ``destination`` is checked before ``source`` is read: never the source itself, and an existing file (a
    folder's transformers files) is replaced only with ``overwrite``, since a converted checkpoint keeps none of a
    training checkpoint's optimizer, schedule or epoch.

    Returns a one-line summary. Raises ``ValueError`` (an unknown target, a destination that cannot be written,
    or a checkpoint that does not fit its config: the options and their overrides named) and
    ``FileNotFoundError``.
    """
    overrides = override_list(overrides)
    given = load_config(config, overrides) if config is not None else None  # a typo in it: said before any reading
    source = resolve_checkpoint(source)  # a hub id: its snapshot folder, which the destination must not be
    check_destination(source, destination, to, overwrite)
    checkpoint = read_checkpoint(source)
    cfg = given if given is not None else resolve_config(None, overrides, checkpoint)
    model, checkpoint = load_detector(cfg, checkpoint)
    state = model.state_dict()
    if to == "hf":
        inference_size = (cfg.data.val_size, cfg.data.val_max_size)
        write_hf(destination, state, cfg.model, checkpoint.class_names, inference_size, overwrite=overwrite)
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
