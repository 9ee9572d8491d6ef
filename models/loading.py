"""A detector from a checkpoint of any format: the config it needs, the check that they agree, the loading.

Every tool that takes ``--checkpoint`` (eval, infer, visualize, both exporters, convert) and ``train.finetune`` go
through :func:`load_detector`:

    ckpt = read_checkpoint("weights/")                     # any format models.checkpoint reads
    cfg = resolve_config(None, ["data.root=..."], ckpt)    # no config file: the checkpoint's own
    model = load_detector(cfg, ckpt)                       # eval mode, on the CPU
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import yaml
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, read_checkpoint
from .config import (
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    apply_values,
    config_from_dict,
    load_config,
    override_list,
)
from .detector import build_detector
from .hf_preprocessor import UnsupportedResize, chooses_resize, inference_size_from_hf
from .weights import load_checkpoint

# Model options that change the state_dict or the outputs; a checkpoint stating another value than the config for
# any of them cannot be loaded as the config describes. The class count is checked on its own (fine-tuning may
# change it).
ARCHITECTURE = (
    "backbone",
    "backbone_norm",
    "dilation",
    "position_embedding",
    "num_feature_levels",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "hidden_dim",
    "nheads",
    "num_queries",
    "enc_n_points",
    "dec_n_points",
    "with_box_refine",
    "two_stage",
    "enc_offset_mode",
    "dec_offset_mode",
    "cope_channels",
)
OFFSET_MODE_KEYS = ("enc_offset_mode", "dec_offset_mode")
CONFIG_SUFFIXES = (".yaml", ".yml")
# The tools' help for the positional config and the checkpoint (every tool reads the same formats).
CONFIG_HELP = "the YAML config (default: the checkpoint's own), then section.key=value overrides"
CHECKPOINT_HELP = (
    "this project's checkpoint, an original Deformable-DETR .pth, a state_dict, a transformers folder "
    "(config.json + model.safetensors), or a Hugging Face hub model id (e.g. SenseTime/deformable-detr)"
)


def tool_error(message: BaseException | str) -> int:
    """Prints ``error: MESSAGE`` on stderr, as every tool reports a run it cannot do (a config, checkpoint, data set
    or file it refuses, a run that fails), and returns 1, the tool's exit status. The other statuses: 2 where argparse
    refuses the options themselves (with the usage line, ``parser.error``), 130 on Ctrl-C."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def split_command_line(items: Iterable[str]) -> tuple[str | None, list[str], list[str]]:
    """Splits a tool's positional arguments into ``(config file or None, section.key=value overrides, the rest)``.

    The config is the first item when it ends in ``.yaml``/``.yml``; an override is an item with ``=`` that names
    no existing file.
    """
    items = list(items)
    config = items.pop(0) if items and items[0].endswith(CONFIG_SUFFIXES) else None
    overrides = [item for item in items if "=" in item and not os.path.exists(item)]
    return config, overrides, [item for item in items if item not in overrides]


def split_config_args(items: Iterable[str]) -> tuple[str | None, list[str]]:
    """``(config file or None, overrides)`` of a tool that takes nothing else positional.

    Raises:
        ConfigError: an item that is neither (the usual slip: ``key value`` or ``key`` without ``=``).
    """
    config, overrides, rest = split_command_line(items)
    if rest:
        raise ConfigError(f"override '{rest[0]}' must look like section.key=value (a config file, if any, comes first)")
    return config, overrides


def _override(key: str, value: Any) -> str:
    return f"model.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def architecture_mismatches(model: ModelConfig, options: Mapping[str, Any], finetune: bool = False) -> list[str]:
    """One line per architecture option on which ``model`` and a checkpoint's ``options`` disagree, each naming both
    values and the override that makes the config fit the checkpoint.

    ``cope_channels`` counts only where the checkpoint has CoPE offsets. With ``finetune``, CoPE offsets in the config
    over the checkpoint's linear ones are no disagreement: the added gates start where the module is the plain one
    (:func:`models.weights.load_checkpoint`'s ``fresh_cope``).
    """
    checkpoint_cope = any(options.get(key) == "cope" for key in OFFSET_MODE_KEYS)
    lines = []
    for key in ARCHITECTURE:
        if key not in options or options[key] == getattr(model, key):
            continue
        if key == "cope_channels" and not checkpoint_cope:
            continue
        if finetune and key in OFFSET_MODE_KEYS and (options[key], getattr(model, key)) == ("linear", "cope"):
            continue
        lines.append(
            f"{key}: the config says {getattr(model, key)!r}, the checkpoint {options[key]!r} "
            f"(override: {_override(key, options[key])})"
        )
    return lines


def check_architecture(model: ModelConfig, checkpoint: Checkpoint, finetune: bool = False) -> None:
    """Raises :class:`CheckpointError` listing every disagreement between ``model`` and what ``checkpoint`` states.

    With ``finetune`` two differences are allowed: another class count (the class heads are re-initialised) and CoPE
    offsets switched on over linear ones (see :func:`architecture_mismatches`).
    """
    lines = architecture_mismatches(model, checkpoint.options, finetune)
    classes = checkpoint.options.get("num_classes")
    if not finetune and classes is not None and classes != model.num_classes:
        lines.append(
            f"num_classes: the config says {model.num_classes!r}, the checkpoint {classes} "
            f"(override: model.num_classes={classes})"
        )
    if lines:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} ({checkpoint.format} format) was made for another model than the config "
            "describes:\n  " + "\n  ".join(lines)
        )


def _folder_resize(checkpoint: Checkpoint, overrides: list[str]) -> tuple[tuple[int, int] | None, str | None]:
    """The resize of a transformers folder's preprocessor_config.json, and None; or, for one the tools cannot apply
    when the overrides choose the resize (``data.val_size`` / ``data.val_max_size``), None and why the folder's was
    not taken (for the warning)."""
    try:
        return inference_size_from_hf(checkpoint.path), None
    except UnsupportedResize as exc:
        if not chooses_resize(overrides):
            raise
        return None, exc.reason


def config_from_checkpoint(checkpoint: Checkpoint, overrides: Iterable[str] = ()) -> Config:
    """The config a checkpoint states: a project checkpoint's saved config, else the defaults (the original's) with
    the model options of its ``args`` / ``config.json`` / weights and, for a transformers folder, the inference
    resize of its ``preprocessor_config.json`` (:func:`models.hf_preprocessor.inference_size_from_hf`); then
    ``overrides``. The backbone is never downloaded (the checkpoint holds it)."""
    overrides = override_list(overrides)
    unused = None  # why a transformers folder's resize was not taken
    if checkpoint.config is not None:
        try:
            cfg = config_from_dict(checkpoint.config)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {checkpoint.path}: its saved config does not fit ({exc})") from exc
    else:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        cfg = apply_values(Config(), {"model": {k: v for k, v in checkpoint.options.items() if k in known}})
        size, unused = _folder_resize(checkpoint, overrides) if checkpoint.format == "hf" else (None, None)
        if size is not None:  # the folder's preprocessor_config.json: the resize its model was made for
            cfg.data.val_size, cfg.data.val_max_size = size
    cfg.model.pretrained_backbone = False
    cfg = apply_overrides(cfg, overrides)
    if checkpoint.config is None and unused is not None:
        warnings.warn(
            f"{unused}; the images are resized instead to short side data.val_size={cfg.data.val_size}, long side "
            f"at most data.val_max_size={cfg.data.val_max_size}",
            stacklevel=2,
        )
    if checkpoint.format == "state_dict" and not chooses_resize(overrides):
        warnings.warn(
            f"checkpoint {checkpoint.path} is a bare state_dict, which does not say at what size its model was "
            f"trained: images are resized to short side data.val_size={cfg.data.val_size}, long side at most "
            f"data.val_max_size={cfg.data.val_max_size} (the original's COCO sizes); pass data.val_size=S "
            "data.val_max_size=M, or the training config file, if it was trained at another size",
            stacklevel=2,
        )
    if checkpoint.config is None and cfg.model.two_stage and "num_queries" not in checkpoint.options:
        overridden = any(item.startswith("model.num_queries=") for item in overrides)
        if not overridden:
            warnings.warn(
                f"checkpoint {checkpoint.path}: a two-stage model's weights do not show how many queries (proposals) "
                f"it selects, and nothing else in the file says: model.num_queries={cfg.model.num_queries} (the "
                "default) is used; pass model.num_queries=N if it was made with another",
                stacklevel=2,
            )
    return cfg


def resolve_config(config: str | os.PathLike | None, overrides: Iterable[str], checkpoint: Checkpoint | None) -> Config:
    """``config`` with ``overrides`` when a file is given, else the checkpoint's own config with them.

    Raises:
        ConfigError: neither a config file nor a checkpoint. FileNotFoundError: no such config file.
    """
    if config is not None:
        return load_config(config, overrides)
    if checkpoint is None:
        raise ConfigError("give a config file (e.g. configs/coco.yaml), or a checkpoint to take the config from")
    return config_from_checkpoint(checkpoint, overrides)


def config_and_checkpoint(
    config: str | os.PathLike | None, overrides: Iterable[str], checkpoint: str | os.PathLike | None
) -> tuple[Config, Checkpoint | None]:
    """What a tool needs first: the checkpoint read (any format) and the config, from ``config`` when given (read
    first), else the checkpoint's own; ``overrides`` on top either way."""
    overrides = override_list(overrides)
    cfg = load_config(config, overrides) if config is not None else None  # a typo in it: said before the reading
    read = read_checkpoint(checkpoint) if checkpoint is not None else None
    return (cfg if cfg is not None else resolve_config(None, overrides, read)), read


def load_detector(
    cfg: Config, checkpoint: str | os.PathLike | Checkpoint | None, finetune: bool = False
) -> tuple[nn.Module, Checkpoint | None]:
    """The detector of ``cfg.model`` in eval mode on the CPU with the weights of ``checkpoint`` (any format).

    Without a checkpoint the weights are random (for testing the tools only). The backbone is never downloaded.
    With ``finetune`` (``train.finetune``) the class heads may have another class count and are re-initialised, and
    CoPE offsets may be switched on over a checkpoint's linear ones (their gates start where the detector is the
    checkpoint's); every other difference is an error naming the option and its override.

    Raises:
        FileNotFoundError: no such checkpoint. CheckpointError: unreadable, or made for another model.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    model_cfg = dataclasses.replace(cfg.model, pretrained_backbone=False)
    if checkpoint is not None and model_cfg.num_classes == "auto" and "num_classes" in checkpoint.options:
        model_cfg = dataclasses.replace(model_cfg, num_classes=checkpoint.options["num_classes"])
    if checkpoint is not None:
        check_architecture(model_cfg, checkpoint, finetune)
    model = build_detector(dataclasses.replace(cfg, model=model_cfg))
    if checkpoint is not None:
        try:
            load_checkpoint(model, checkpoint, reinit_class_heads=finetune, fresh_cope=finetune)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {checkpoint.path}: {exc}") from exc
    return model.eval(), checkpoint
