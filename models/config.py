"""Typed configuration: dataclasses with the original's defaults, YAML files, ``section.key=value`` overrides.

The sections mirror what they build: ``model`` -> ``build_detector``, ``loss`` -> ``build_criterion`` (matcher
costs and loss weights), ``training_queries`` -> ``build_query_aids`` (training-only extra queries), ``data`` -> the
data sets, ``train`` -> the optimiser, schedule and loop.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from deformable.modules import OFFSET_MODES  # MSDeformAttn's offset_mode values

from .files import atomic_write_text

BACKBONE_NORMS = ("frozen_bn", "gn")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:<index> (:func:`is_device_name`)
AMP_MODES = ("none", "bf16", "fp16")
# data.format: "auto" or a layout of deformable.data.layouts.LAYOUTS (a test keeps the two lists alike)
DATA_FORMATS = ("auto", "coco", "roboflow", "yolo", "voc", "roboflow-voc")
SYNTHETIC_SETS = ("", "shapes")  # data.synthetic: none, or the shapes demo set (deformable.data.shapes)
MIN_IMAGE_SIDE = 32  # data.image_size N: the short side, at least one stride-32 cell (deformable.data.sizes.STEP)


def _at_least(low: float) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


def _sizes(count: str = "") -> tuple[typing.Callable[[Any], bool], str]:
    """A list of pixel sizes >= 1: non-empty, or exactly ``[min, max]`` with ``min <= max`` when ``count`` is
    ``"pair"``."""
    if count == "pair":
        return (lambda v: len(v) == 2 and 1 <= v[0] <= v[1]), "two sizes [min, max] with 1 <= min <= max"
    return (lambda v: len(v) > 0 and min(v) >= 1), "a non-empty list of sizes >= 1"


def _one_of(values: tuple[str, ...]) -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v in values), f"one of {', '.join(values)}"


def is_device_name(value: Any) -> bool:
    """Whether ``value`` names a device the tools run on: one of :data:`DEVICES`, or ``cuda:<index>``."""
    return isinstance(value, str) and (value in DEVICES or re.fullmatch(r"cuda:\d+", value) is not None)


def _image_size(value: Any) -> bool:
    """``data.image_size``: 0 (the sizes as set), ``auto`` or a short side >= :data:`MIN_IMAGE_SIDE`."""
    if isinstance(value, str):
        return value == "auto"
    return isinstance(value, int) and (value == 0 or value >= MIN_IMAGE_SIDE)


# What the values of a section may be, beyond their type: (test, what the message says it must be).
MODEL_LIMITS = {
    "num_feature_levels": _at_least(1),
    "enc_layers": _at_least(0),
    "dec_layers": _at_least(1),
    "dim_feedforward": _at_least(1),
    "hidden_dim": _at_least(1),
    "dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "nheads": _at_least(1),
    "num_queries": _at_least(1),
    "enc_n_points": _at_least(1),
    "dec_n_points": _at_least(1),
}
LOSS_LIMITS = {
    **{name: _at_least(0) for name in ("set_cost_class", "set_cost_bbox", "set_cost_giou")},
    **{name: _at_least(0) for name in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef")},
    "focal_alpha": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "num_select": _at_least(1),
}
TRAINING_QUERIES_LIMITS = {
    "dn_groups": _at_least(0),
    "dn_label_noise": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "dn_box_noise": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "query_groups": _at_least(1),
}
DATA_LIMITS = {
    "format": _one_of(DATA_FORMATS),
    "image_size": (_image_size, f"0, 'auto' or a short side >= {MIN_IMAGE_SIDE}"),
    "num_workers": _at_least(0),
    "min_image_size": _at_least(32),
    "max_image_size": _at_least(32),
    "train_scales": _sizes(),
    "train_max_size": _at_least(1),
    "crop_scales": _sizes(),
    "crop_size": _sizes("pair"),
    "val_size": _at_least(1),
    "val_max_size": _at_least(1),
    "synthetic": ((lambda v: v in SYNTHETIC_SETS), "'' (none) or 'shapes'"),
    "synthetic_train_images": _at_least(1),
    "synthetic_val_images": _at_least(1),
    "synthetic_image_size": _at_least(8),  # each side drawn in [0.75, 1] x this: 6 px at least
    "synthetic_max_objects": _at_least(1),
}
TRAIN_LIMITS = {
    "epochs": _at_least(1),
    "batch_size": _at_least(1),
    "lr": ((lambda v: v > 0), "> 0"),
    "lr_backbone": _at_least(0),
    "lr_linear_proj_mult": _at_least(0),
    "weight_decay": _at_least(0),
    "lr_drop": _at_least(1),
    "clip_max_norm": _at_least(0),
    "ema_decay": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "eval_every": _at_least(0),
    "checkpoint_every": _at_least(0),
    "patience": _at_least(0),
    "max_iters_per_epoch": _at_least(0),
    "amp": _one_of(AMP_MODES),
    "device": (is_device_name, f"one of {', '.join(DEVICES)} or cuda:<index>"),
}


def _check_limit(section: str, name: str, value: Any, limits: Mapping[str, tuple]) -> None:
    """Raises ConfigError when ``section.name`` is in ``limits`` and ``value`` breaks it. Values read from a file or
    an override arrive type-checked; a value of another type set in Python is left to fail where it is used."""
    if name not in limits or not isinstance(value, (int, float, str, list)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{section}.{name}' must be a finite number, got {value!r}")
    test, rule = limits[name]
    try:
        ok = test(value)
    except TypeError:  # a string for a number: the type check reports it
        return
    if not ok:
        raise ConfigError(f"config key '{section}.{name}' must be {rule}, got {value!r}")


@dataclass
class ModelConfig:
    """The detector; argument names are the original's (main.py)."""

    backbone: str = "resnet50"  # resnet50 | resnet101 | resnet18 | resnet34 | timm/<name>
    dilation: bool = False  # DC5: dilate the last stage instead of striding
    position_embedding: str = "sine"  # sine | learned
    num_feature_levels: int = 4
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    hidden_dim: int = 256
    dropout: float = 0.1
    nheads: int = 8
    num_queries: int = 300
    enc_n_points: int = 4
    dec_n_points: int = 4
    with_box_refine: bool = False
    two_stage: bool = False
    aux_loss: bool = True
    num_classes: int | str = 91  # category id is the label (the original's convention): 91 for COCO; "auto": max id + 1
    pretrained_backbone: bool = True
    train_backbone: bool = True  # False freezes the whole backbone (the original: lr_backbone == 0)
    # frozen_bn: the original's FrozenBatchNorm, stem and first stage frozen (for ImageNet or checkpoint weights);
    # gn: GroupNorm(32) trained with every layer, for a ResNet trained from random weights (He et al. 2019)
    backbone_norm: str = "frozen_bn"
    enc_offset_mode: str = "linear"  # linear | cope (deformable.MSDeformAttn offset_mode)
    dec_offset_mode: str = "linear"
    cope_channels: int = 2  # counting channels per head of every "cope" MSDeformAttn (BENCHMARKS.md: 4 counts better
    # on some probes and costs more)

    def __setattr__(self, name: str, value: Any) -> None:
        _check_limit("model", name, value, MODEL_LIMITS)
        if name == "backbone_norm" and value not in BACKBONE_NORMS:
            raise ConfigError(
                f"config key 'model.backbone_norm' must be one of {', '.join(BACKBONE_NORMS)}, got {value!r}"
            )
        if name in ("enc_offset_mode", "dec_offset_mode") and value not in OFFSET_MODES:
            raise ConfigError(f"config key 'model.{name}' must be one of {', '.join(OFFSET_MODES)}, got {value!r}")
        if name == "cope_channels" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"config key 'model.cope_channels' must be an integer >= 1, got {value!r}")
        if name == "num_classes" and not (
            (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or value == "auto"
        ):
            raise ConfigError(f"config key 'model.num_classes' must be an integer >= 1 or 'auto', got {value!r}")
        super().__setattr__(name, value)


@dataclass
class LossConfig:
    """Hungarian matcher costs and loss weights (the original's defaults)."""

    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    num_select: int = 100  # post-processing top-k
    # IoU-aware classification (varifocal loss, Zhang et al. VarifocalNet 2021, as RT-DETR trains): a matched
    # prediction's class target is the IoU of its box with its target's, not 1; on every loss term alike.
    iou_aware: bool = False

    def __setattr__(self, name: str, value: Any) -> None:
        _check_limit("loss", name, value, LOSS_LIMITS)
        super().__setattr__(name, value)


@dataclass
class TrainingQueriesConfig:
    """Training-only extra decoder queries (``models.training_queries.build_query_aids`` -> ``QueryAids``); their
    parameters are not the detector's, a trained checkpoint is a plain detector. All off: the original's recipe."""

    dn_groups: int = 0  # denoising groups of noised ground truth (DN-DETR; the paper uses 5); 0: off
    dn_label_noise: float = 0.2  # probability that a denoising query's label is another class (DN-DETR's 0.2)
    dn_box_noise: float = 0.4  # centre shift up to this x half the size, size x [1 - this, 1 + this] (DN-DETR's)
    query_groups: int = 1  # query groups, each matched one-to-one on its own (Group DETR); 1: off; not two-stage

    def __setattr__(self, name: str, value: Any) -> None:
        _check_limit("training_queries", name, value, TRAINING_QUERIES_LIMITS)
        super().__setattr__(name, value)


@dataclass
class DataConfig:
    """The data set in ``root``: COCO, Roboflow COCO export, Ultralytics YOLO, Pascal VOC or Roboflow Pascal VOC
    export (``deformable.data``)."""

    root: str = "data/coco"
    format: str = "auto"  # auto (detected from root) | coco | roboflow | yolo | voc | roboflow-voc
    train_split: str = "auto"  # auto: coco train2017 (train), roboflow train, yolo data.yaml's, voc train (trainval)
    val_split: str = "auto"  # auto: coco val2017 (val), roboflow valid, yolo data.yaml's val, voc val (test)
    # coco: the train / val annotation file (relative to root unless absolute; either set, format auto reads COCO);
    # "": annotations/instances_<split>.json
    train_ann: str = ""
    val_ann: str = ""
    image_size: int | str = 0  # 0: the sizes below as set; auto: short side from the data; N: short side N px
    min_image_size: int = 256  # limits of image_size: auto (deformable.data.sizes)
    max_image_size: int = 640
    train_scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    train_max_size: int = 1333
    crop: bool = True  # the DETR random crop branch
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    val_size: int = 800
    val_max_size: int = 1333
    hflip: bool = True
    num_workers: int = 2
    synthetic: str = ""  # "shapes": generate the synthetic shapes set into root when missing (never over other data)
    synthetic_train_images: int = 1000  # the synthetic data set (only read when generating it)
    synthetic_val_images: int = 200
    synthetic_image_size: int = 128  # each side is drawn in [0.75, 1] x this
    synthetic_max_objects: int = 4

    def __setattr__(self, name: str, value: Any) -> None:
        _check_limit("data", name, value, DATA_LIMITS)
        super().__setattr__(name, _expand_user(value) if name in ("root", "train_ann", "val_ann") else value)


@dataclass
class TrainConfig:
    """Optimiser, schedule and loop (the original's recipe)."""

    epochs: int = 50
    batch_size: int = 2  # per process
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_backbone_names: list[str] = field(default_factory=lambda: ["backbone.0"])
    lr_linear_proj_mult: float = 0.1
    lr_linear_proj_names: list[str] = field(default_factory=lambda: ["reference_points", "sampling_offsets"])
    weight_decay: float = 1e-4
    lr_drop: int = 40
    clip_max_norm: float = 0.1
    # exponential moving average of the weights, evaluated and saved as the model (deformable.training.ema); 0: off
    ema_decay: float = 0.0
    eval_every: int = 1
    checkpoint_every: int = 5  # also keep checkpoint_<epoch>.pth every this many epochs (0: never)
    patience: int = 0  # stop when the validation AP has not improved for this many epochs (0: never stop early)
    resume: str = ""  # "", "auto" (latest in output_dir) or a checkpoint path
    finetune: str = ""  # a checkpoint to start from, class heads re-initialised when the class count differs
    amp: str = "none"  # none | bf16 | fp16
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:<index> (train and eval; infer and visualize take --device)
    max_iters_per_epoch: int = 0  # 0: the whole epoch (a cap is useful for smoke tests)

    def __setattr__(self, name: str, value: Any) -> None:
        _check_limit("train", name, value, TRAIN_LIMITS)
        super().__setattr__(name, _expand_user(value) if name in ("resume", "finetune") else value)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training_queries: TrainingQueriesConfig = field(default_factory=TrainingQueriesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/coco"

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, _expand_user(value) if name == "output_dir" else value)


def _expand_user(value: Any) -> Any:
    """A path with ``~`` expanded: a shell leaves ``data.root=~/x`` as it is, and Python's file functions would take
    the ``~`` literally (a run would create a folder named ``~``). Set on every path key, however the config is made
    (YAML, override, Python), so reads, messages and the saved config.yaml hold the path meant."""
    return os.path.expanduser(value) if isinstance(value, str) else value


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema; the message names the key."""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Checks ``value`` against a field's type (bool, int, float, str, list[...]) and converts ints to floats."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)[:1]
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}': {value!r} fits none of {annotation}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}' expects null, got {value!r}")
        return None
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}' has an unsupported type {annotation}")


def _apply(obj: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known keys here: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{path}' is a section and expects a mapping, got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({exc})") from exc
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "e" in raw.lower() and "." not in raw:
        value = float(raw)  # YAML 1.1 reads "1e-4" as a string; accept it as the number it is
    elif isinstance(value, str) and _looks_like_float(raw):
        value = float(raw)
    return key.strip().split("."), value


def _looks_like_float(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return raw.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return nested


BASE_KEY = "_base_"


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = ()) -> Config:
    """Reads a YAML config (``None``: the defaults) and applies ``section.key=value`` overrides in order.

    A file may start from another: ``_base_: coco.yaml`` (a path relative to the including file) reads that file
    first, then this file's keys on top, section by section (a list replaces the base's list); bases may have
    bases. So the order is: the dataclass defaults < the base (and its bases) < the file < the overrides.

    Raises:
        FileNotFoundError: the file, or a base it names, does not exist.
        ConfigError: malformed YAML, a ``_base_`` cycle (the files named), an unknown key (named), or a value of
            the wrong type (named).
    """
    cfg = Config()
    for file, data in config_chain(path) if path is not None else []:
        try:
            _apply(cfg, _normalise_floats(data))
        except ConfigError as exc:  # named with the file that states it (a base's, or the file's own)
            raise ConfigError(f"config file {file}: {exc}") from exc
    return apply_overrides(cfg, overrides)


def config_chain(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """``(file, mapping)`` of a YAML config file and its ``_base_`` files, the deepest base first (each file's own
    keys, its ``_base_`` removed): applied in this order, each over the ones before, they give the file's config.

    Raises:
        FileNotFoundError: the file, or a base it names, does not exist. ConfigError: malformed YAML, or a cycle.
    """
    real = os.path.realpath(path)
    if real in _chain:
        cycle = " -> ".join([*_chain[_chain.index(real) :], real])
        raise ConfigError(f"config files include each other through {BASE_KEY}: {cycle}")
    if not os.path.isfile(path):
        included = f" (the {BASE_KEY} of {_chain[-1]})" if _chain else ""
        raise FileNotFoundError(f"config file not found: {path}{included}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return [(os.fspath(path), data)]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: {BASE_KEY} must be a file name, got {base!r}")
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), base)
    return [*config_chain(base_path, (*_chain, real)), (os.fspath(path), data)]


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Applies ``section.key=value`` overrides to ``cfg`` in place, in order, and returns it.

    Raises:
        ConfigError: an unknown key (named) or a value of the wrong type (named); ``overrides`` a single string.
    """
    for text in override_list(overrides):
        keys, value = parse_override(text)
        _apply(cfg, _nest(keys, value))
    return cfg


def override_list(overrides: Iterable[str]) -> list[str]:
    """``overrides`` as a list.

    Raises:
        ConfigError: ``overrides`` is a single string (it would be read a character at a time).
    """
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(
            f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}; "
            f"pass [{overrides!r}]"
        )
    return list(overrides)


def apply_values(cfg: Config, values: Mapping[str, Any]) -> Config:
    """Sets nested ``{section: {key: value}}`` values on ``cfg`` in place (types checked) and returns it."""
    _apply(cfg, values)
    return cfg


def _normalise_floats(data: Any) -> Any:
    """YAML 1.1 (safe_load) reads ``1e-4`` as a string; turn such strings back into numbers."""
    if isinstance(data, Mapping):
        return {k: _normalise_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_normalise_floats(v) for v in data]
    if isinstance(data, str) and _looks_like_float(data) and any(c in data.lower() for c in "e."):
        return float(data)
    return data


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain dict (YAML/torch.save friendly) of the resolved config."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict`; unknown keys are an error."""
    cfg = Config()
    _apply(cfg, data)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Writes the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
