"""Hugging Face transformers Deformable DETR folders (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``):
reading them as the original's state_dict and model options, and writing them from ours.

The hub's official models (``SenseTime/deformable-detr``, ``-with-box-refine``, ``-with-box-refine-two-stage``,
``-single-scale``) use a timm ResNet-50 (``use_timm_backbone: true``), whose parameter names and architecture are
torchvision's. Key names are mapped by :mod:`models.hf_names`; this module handles files and ``config.json``.

    state, hf_config = read_hf("deformable-detr/")           # original key names, parsed config.json
    overrides = model_overrides_from_hf(hf_config)           # {"two_stage": False, "num_queries": 300, ...}
    write_hf("out/", model.state_dict(), cfg.model, class_names)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import HF_WEIGHTS, CheckpointError, box_refine_in_weights, options_from_weights, torch_load
from .config import DataConfig, ModelConfig
from .files import FileTargetError, atomic_write, check_folder_target, fsync_dir, staging_dir, temp_prefix
from .hf_names import (
    RESNETS,
    backbone_from_hf,
    fill_tied_class_heads,
    hf_backbone,
    hf_to_original,
    learned_position_prefix,
    original_to_hf,
)
from .hf_preprocessor import PREPROCESSOR_NAME, preprocessor_config, read_json_object

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHT_NAMES = HF_WEIGHTS  # in order of preference
# Every file a transformers folder is read from: an existing one is replaced only when the writer is told to.
HF_FILES = (CONFIG_NAME, PREPROCESSOR_NAME, *WEIGHT_NAMES)
MODEL_TYPE = "deformable_detr"
ARCHITECTURE = "DeformableDetrForObjectDetection"
# transformers' DeformableDetrConfig defaults (4.x and 5.x agree), for config.json files that omit a key.
HF_DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "num_queries": 300,
    "two_stage_num_proposals": 300,
    "num_feature_levels": 4,
    "encoder_n_points": 4,
    "decoder_n_points": 4,
    "with_box_refine": False,
    "two_stage": False,
    "position_embedding_type": "sine",
    "dropout": 0.1,
    "auxiliary_loss": False,
    "activation_function": "relu",
    "num_channels": 3,
}
HF_NUM_LABELS_DEFAULT = 2  # what transformers builds when config.json has neither num_labels nor id2label
# transformers' timm backbone: it asks timm for feature stages [2, 3, 4] ([4] for one level), this project for the last
# three (-3, -2, -1, of which it keeps the last one for one level): the same stages for a model with five only.
HF_TIMM_OUT_INDICES = (2, 3, 4)
# transformers replaces every nn.BatchNorm2d of its backbone (subclasses too) by its frozen BatchNorm, which has this
# eps and no activation.
HF_BATCH_NORM_EPS = 1e-5


def _weights_in(folder: str) -> str | None:
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def is_hf_source(path: str | os.PathLike) -> bool:
    """True for a folder holding ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``, or for such a
    weights file with ``config.json`` beside it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, CONFIG_NAME)) and _weights_in(path) is not None
    folder, name = os.path.split(os.path.abspath(path))
    return name in WEIGHT_NAMES and os.path.isfile(path) and os.path.isfile(os.path.join(folder, CONFIG_NAME))


def _locate(path: str) -> tuple[str, str]:
    """``(config.json, weights file)`` of a folder or a weights file; FileNotFoundError naming what is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist (expected a transformers Deformable DETR folder)")
    if os.path.isdir(path):
        weights = _weights_in(path)
        if weights is None:
            raise FileNotFoundError(
                f"{path} has no {' or '.join(WEIGHT_NAMES)} (expected a transformers Deformable DETR folder: "
                f"{CONFIG_NAME} + weights, or a training run's folder: checkpoint.pth)"
            )
        folder = path
    else:
        folder, weights = os.path.dirname(os.path.abspath(path)), path
    config = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{config} not found: a transformers weights file needs its {CONFIG_NAME} beside it")
    return config, weights


def _read_config(path: str) -> dict[str, Any]:
    config = read_json_object(path, "a transformers config.json")
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{path} describes model_type {config.get('model_type')!r}, expected {MODEL_TYPE!r} "
            f"(a transformers Deformable DETR)"
        )
    return config


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """One weights file, or every shard an ``*.index.json`` lists (its ``weight_map``: key -> shard file), merged."""
    if path.endswith(".index.json"):
        try:
            with open(path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path} is not a transformers shard index with a weight_map ({exc})") from exc
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_weights(os.path.join(os.path.dirname(path), shard)))
        return state
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist (a shard its index lists); expected transformers weights")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except Exception as exc:  # safetensors raises its own error types for torn headers and data
            raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from exc
    else:
        state = torch_load(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors; expected transformers Deformable DETR weights")
    return dict(state)


def read_hf(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a transformers Deformable DETR folder (or its weights file) as the original's state_dict.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors`` (preferred) or ``pytorch_model.bin``, or one
            of those files with ``config.json`` beside it.

    Returns:
        ``(state_dict, config)``: tensors on the CPU under the original's key names (see
        :func:`models.hf_names.hf_to_original`), and the parsed ``config.json``. transformers saves a tied head
        under one of its names; the others are absent, and the strict loader counts a head covered by any alias.
        A box-refinement (not two-stage) folder that transformers 5 saved holds ``class_embed.0`` only (it ties
        the others to it): the missing heads are filled from it (:func:`models.hf_names.fill_tied_class_heads`).

    Raises:
        FileNotFoundError: no such path, no weights file, or no ``config.json``.
        CheckpointError (a ValueError): unreadable JSON, another ``model_type``, a backbone this project cannot
            build or that transformers runs otherwise (:func:`hf_backbone_differences`: timm's BatchNormAct2d, a
            BatchNorm eps other than 1e-5, other than five feature stages), a corrupt weights file, or a key with no
            counterpart (named with the file).
    """
    config_path, weights_path = _locate(os.fspath(path))
    config = _read_config(config_path)
    try:
        backbone = model_overrides_from_hf(config)["backbone"]  # an unsupported one makes the keys meaningless
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    try:
        differences = hf_backbone_differences(backbone)
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    if differences:
        raise CheckpointError(
            f"{config_path}: its backbone {hf_backbone(backbone)!r} runs otherwise in transformers than as this "
            f"project's model.backbone={backbone}, so the project cannot reproduce what transformers computes for "
            "this folder: " + "; ".join(differences)
        )
    state = _read_weights(weights_path)
    try:
        state = hf_to_original(state, weights_path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    if config.get("with_box_refine", False) and not config.get("two_stage", False):
        layers = int(config.get("decoder_layers", HF_DEFAULTS["decoder_layers"]))
        filled = fill_tied_class_heads(state, layers)
        if filled:
            logger.info(
                "%s: class_embed.1..%d are absent (transformers 5 ties them to class_embed.0 and saves that one): "
                "every decoder layer uses class_embed.0, as transformers 5 runs this model",
                weights_path,
                layers - 1,
            )
    return state, config


def _more_than_norm(module: nn.BatchNorm2d) -> str:
    """What a BatchNorm2d subclass computes besides the norm (timm's BatchNormAct2d: its activation and dropout, unless
    both are Identity), described; empty for a plain BatchNorm."""
    if type(module).forward is nn.BatchNorm2d.forward:
        return ""
    children = list(module.children())
    if not children:
        return "with a forward of its own"
    extra = [type(c).__name__ for c in children if not isinstance(c, nn.Identity)]
    return f"with {', '.join(extra)} after the norm" if extra else ""


@functools.lru_cache(maxsize=32)
def _timm_differences(name: str) -> tuple[str, ...]:
    """How transformers would run the timm model ``name`` otherwise than this project: its structure (built without
    weights, ``features_only`` as both build it) is inspected for BatchNorm layers transformers would change and for
    the feature stages each takes; empty when both run it alike."""
    try:
        import timm
    except ImportError as exc:
        raise ValueError(f"checking the timm backbone {name!r} for transformers needs timm (pip install timm)") from exc

    def create() -> nn.Module:
        return timm.create_model(name, pretrained=False, features_only=True, out_indices=(-3, -2, -1))

    try:
        try:
            with torch.device("meta"):  # the structure only: no memory, no initialisation
                net = create()
        except Exception:  # a model whose initialisation needs real tensors: built on the CPU
            net = create()
    except (RuntimeError, ValueError, IndexError, AssertionError) as exc:  # unknown name, too few stages, ...
        raise ValueError(f"unknown or unsupported timm backbone {name!r}: {exc}") from exc
    found = []
    stages = len(net.feature_info.info)
    ours = tuple(range(stages)[-3:])
    if ours != HF_TIMM_OUT_INDICES:
        found.append(
            f"it has {stages} feature stages: transformers takes stages {list(HF_TIMM_OUT_INDICES)} (out_indices), "
            f"this project the last three {list(ours)}; they are the same stages only for a model with five"
        )
    norms = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    changed = [(n, m, _more_than_norm(m)) for n, m in norms]
    changed = [(n, m, extra) for n, m, extra in changed if extra]
    if changed:
        layer, module, extra = changed[0]
        found.append(
            f"{len(changed)} of its BatchNorm layers do more than normalise (e.g. {layer}, a {type(module).__name__} "
            f"{extra}): transformers replaces each by its plain frozen BatchNorm, dropping that, where this project "
            "keeps it"
        )
    other_eps = [(n, m.eps) for n, m in norms if m.eps != HF_BATCH_NORM_EPS]
    if other_eps:
        layer, eps = other_eps[0]
        found.append(
            f"{len(other_eps)} of its BatchNorm layers have eps {eps} (e.g. {layer}): transformers' frozen BatchNorm "
            f"uses {HF_BATCH_NORM_EPS}"
        )
    return tuple(found)


def hf_backbone_differences(backbone: str) -> tuple[str, ...]:
    """How transformers would run our ``backbone`` (``resnet50``, ``timm/<name>``) otherwise than this project; empty
    when alike.

    transformers builds a timm model for it, like this project, but takes feature stages [2, 3, 4] (this project
    the last three) and replaces every BatchNorm with a plain frozen one of eps 1e-5 (this project keeps timm's
    BatchNormAct2d activations and each layer's eps). The ResNets are torchvision's networks (five stages, plain
    BatchNorm): not built; any other is built without weights and inspected (:func:`_timm_differences`).

    Raises:
        ValueError: a backbone transformers does not build (not a ResNet nor timm's), or an unknown timm model.
    """
    name = hf_backbone(backbone)
    return () if name.split(".")[0] in RESNETS else _timm_differences(name)


def _check_supported(hf_config: Mapping[str, Any]) -> None:
    activation = hf_config.get("activation_function", HF_DEFAULTS["activation_function"])
    if activation != "relu":
        raise ValueError(f"config.json's activation_function {activation!r} is not supported (the original uses relu)")
    channels = hf_config.get("num_channels", HF_DEFAULTS["num_channels"])
    if channels != 3:
        raise ValueError(f"config.json's num_channels {channels} is not supported (RGB images, 3 channels)")
    if hf_config.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"config.json's model_type is {hf_config.get('model_type')!r}, expected {MODEL_TYPE!r}")


def _same(hf_config: Mapping[str, Any], encoder_key: str, decoder_key: str, field: str) -> Any:
    """One value the original uses for both encoder and decoder; different values cannot be represented."""
    enc = hf_config.get(encoder_key, HF_DEFAULTS[encoder_key])
    dec = hf_config.get(decoder_key, HF_DEFAULTS[decoder_key])
    if enc != dec:
        raise ValueError(
            f"config.json has {encoder_key}={enc} but {decoder_key}={dec}; this project's model.{field} is one "
            f"value for both"
        )
    return enc


def _num_labels(hf_config: Mapping[str, Any]) -> int:
    if "num_labels" in hf_config:
        return int(hf_config["num_labels"])
    id2label = hf_config.get("id2label")
    return len(id2label) if isinstance(id2label, Mapping) and id2label else HF_NUM_LABELS_DEFAULT


def model_overrides_from_hf(hf_config: Mapping[str, Any]) -> dict[str, object]:
    """``ModelConfig`` field -> value that a transformers ``config.json`` describes (its defaults where it omits a
    key); ``pretrained_backbone`` is False (the weights hold the backbone), offsets are linear.

    Raises:
        ValueError: a backbone that is not timm's, different encoder/decoder heads or feed-forward widths, another
            activation than relu, or another position embedding than sine/learned.
    """
    _check_supported(hf_config)

    def get(key: str) -> Any:
        return hf_config.get(key, HF_DEFAULTS[key])

    position = get("position_embedding_type")
    if position not in ("sine", "learned"):
        raise ValueError(f"config.json's position_embedding_type {position!r} is not supported (sine or learned)")
    two_stage = bool(get("two_stage"))
    return {
        "backbone": backbone_from_hf(hf_config),
        "dilation": bool(hf_config.get("dilation") or False),
        "position_embedding": position,
        "num_feature_levels": int(get("num_feature_levels")),
        "enc_layers": int(get("encoder_layers")),
        "dec_layers": int(get("decoder_layers")),
        "dim_feedforward": int(_same(hf_config, "encoder_ffn_dim", "decoder_ffn_dim", "dim_feedforward")),
        "hidden_dim": int(get("d_model")),
        "dropout": float(get("dropout")),
        "nheads": int(_same(hf_config, "encoder_attention_heads", "decoder_attention_heads", "nheads")),
        # two-stage: transformers keeps two_stage_num_proposals queries and ignores num_queries (the original: both
        # are num_queries).
        "num_queries": int(get("two_stage_num_proposals") if two_stage else get("num_queries")),
        "enc_n_points": int(get("encoder_n_points")),
        "dec_n_points": int(get("decoder_n_points")),
        "with_box_refine": bool(get("with_box_refine")),
        "two_stage": two_stage,
        "num_classes": _num_labels(hf_config),
        "pretrained_backbone": False,
        "backbone_norm": "frozen_bn",
        "enc_offset_mode": "linear",
        "dec_offset_mode": "linear",
    }


UNUSED_LABEL = "N/A"  # the name of an unused id in transformers' COCO configs (the original's convention)


def class_names_from_hf(hf_config: Mapping[str, Any]) -> dict[int, str]:
    """Category id -> name from ``id2label``, without the ``N/A`` of unused ids; transformers' placeholder
    ``LABEL_<id>`` is a name only beside real names (a class nobody named, shown as transformers shows it), and
    nothing when every id has it: empty then (callers show numeric ids)."""
    id2label = hf_config.get("id2label")
    if not isinstance(id2label, Mapping):
        return {}
    try:
        names = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        bad = next(k for k in id2label if not str(k).strip().lstrip("-").isdigit())
        raise ValueError(f"id2label must map class indices to names, got the key {bad!r}") from None
    names = {k: v for k, v in sorted(names.items()) if v != UNUSED_LABEL}
    return {} if all(v == f"LABEL_{k}" for k, v in names.items()) else names


def _offset_modes(model_cfg: ModelConfig) -> list[tuple[str, str]]:
    """``(model.enc_offset_mode, value), (model.dec_offset_mode, value)``."""
    return [(f"model.{k}", getattr(model_cfg, k)) for k in ("enc_offset_mode", "dec_offset_mode")]


def _check_writable(model_cfg: ModelConfig) -> None:
    """Configurations transformers' Deformable DETR cannot build the same way."""
    cope = [f"{key}={value}" for key, value in _offset_modes(model_cfg) if value != "linear"]
    if cope:
        raise ValueError(
            f"{' and '.join(cope)} (CoPE offsets) cannot be written for transformers, which has linear sampling "
            "offsets only"
        )
    if model_cfg.backbone_norm != "frozen_bn":
        raise ValueError(
            f"backbone_norm={model_cfg.backbone_norm!r} cannot be written for transformers, whose backbones have "
            "frozen BatchNorm only"
        )
    if model_cfg.num_feature_levels == 2:
        raise ValueError(
            "num_feature_levels=2 cannot be written for transformers: it takes three backbone maps whenever "
            "num_feature_levels > 1, this model two"
        )
    if model_cfg.two_stage and not model_cfg.with_box_refine:
        raise ValueError("two_stage without with_box_refine cannot be written for transformers (it requires both)")
    if model_cfg.dec_layers == 1 and not model_cfg.two_stage:
        # transformers 5 ties bbox_embed.1.. (class_embed.1..) to bbox_embed.0 and refuses a tie with no target.
        raise ValueError(
            "dec_layers=1 cannot be written for transformers (unless two_stage): transformers 5 cannot build a "
            "DeformableDetrForObjectDetection with one decoder layer and one box head, even from its own config"
        )
    differences = hf_backbone_differences(model_cfg.backbone)
    if differences:
        raise ValueError(
            f"model.backbone={model_cfg.backbone} cannot be written for transformers, which would run it otherwise "
            f"than this project (its predictions would differ from this model's): {'; '.join(differences)}. "
            "transformers runs the ResNets, and timm models with five feature stages and plain BatchNorm, as this "
            "project does"
        )


def hf_config(model_cfg: ModelConfig, class_names: Mapping[int, str] | None) -> dict[str, Any]:
    """config.json in the hub's layout (``use_timm_backbone`` + ``backbone``, which transformers 4.x and 5.x read)."""
    names = dict(class_names or {})
    extra = sorted(k for k in names if not 0 <= k < model_cfg.num_classes)
    if extra:
        raise ValueError(f"class ids {extra} are outside the model's {model_cfg.num_classes} classes")
    # Beside named classes an unnamed id is unused (the original's class 0, COCO's gaps): N/A, as in transformers'
    # COCO configs; with no name at all, transformers' placeholders.
    id2label = {i: names.get(i, UNUSED_LABEL if names else f"LABEL_{i}") for i in range(model_cfg.num_classes)}
    options = {
        "d_model": model_cfg.hidden_dim,
        "encoder_layers": model_cfg.enc_layers,
        "decoder_layers": model_cfg.dec_layers,
        "encoder_attention_heads": model_cfg.nheads,
        "decoder_attention_heads": model_cfg.nheads,
        "encoder_ffn_dim": model_cfg.dim_feedforward,
        "decoder_ffn_dim": model_cfg.dim_feedforward,
        "num_queries": model_cfg.num_queries,
        "two_stage_num_proposals": model_cfg.num_queries,
        "num_feature_levels": model_cfg.num_feature_levels,
        "encoder_n_points": model_cfg.enc_n_points,
        "decoder_n_points": model_cfg.dec_n_points,
        "with_box_refine": model_cfg.with_box_refine,
        "two_stage": model_cfg.two_stage,
        "position_embedding_type": model_cfg.position_embedding,
        "dilation": model_cfg.dilation,
        "dropout": model_cfg.dropout,
        "auxiliary_loss": model_cfg.aux_loss,
        "activation_function": "relu",
        "num_channels": 3,
    }
    backbone = {
        "use_timm_backbone": True,
        "backbone": hf_backbone(model_cfg.backbone),
        "use_pretrained_backbone": False,
    }
    labels = {"id2label": {str(k): v for k, v in id2label.items()}, "label2id": {v: k for k, v in id2label.items()}}
    try:
        from transformers import DeformableDetrConfig
    except ImportError:
        return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **options, **backbone, **labels}
    config = DeformableDetrConfig(**options, **backbone, id2label=id2label, architectures=[ARCHITECTURE]).to_dict()
    config.pop("backbone_config", None)  # 5.x derives it from use_timm_backbone + backbone; 4.x refuses both
    return {**config, **backbone, **labels}


def _check_weights(state: Mapping[str, torch.Tensor], model_cfg: ModelConfig) -> None:
    """The state_dict must be the model the config describes (config.json is written from the config)."""
    shown = options_from_weights(state)
    shown.setdefault("with_box_refine", box_refine_in_weights(state))  # one box head: no values to compare
    if model_cfg.backbone.startswith("timm/"):
        shown.pop("backbone", None)  # a timm ResNet has the torchvision one's names: the weights cannot tell them apart
    lines = [
        f"{k}: config {getattr(model_cfg, k)!r}, weights {v!r}" for k, v in shown.items() if getattr(model_cfg, k) != v
    ]
    if lines:
        raise ValueError("the state_dict does not fit the model config: " + "; ".join(lines))


def write_hf(
    folder: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    class_names: Mapping[int, str] | None = None,
    inference_size: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> None:
    """Writes a transformers Deformable DETR folder: ``config.json``, ``model.safetensors`` and
    ``preprocessor_config.json``.

    ``DeformableDetrForObjectDetection.from_pretrained(folder)`` then predicts what our detector predicts, and
    ``AutoImageProcessor.from_pretrained(folder)`` resizes as the tools do (``inference_size``), so that the folder
    read back (:func:`inference_size_from_hf`) keeps the inference size. A new folder appears complete or not at
    all (written beside it, then renamed); in an existing folder each file is replaced atomically.

    Args:
        folder: the output folder; it may exist, but holds none of :data:`HF_FILES` unless ``overwrite``.
        state_dict: the detector's state_dict, the original's key names (aliases may share storage).
        model_cfg: the detector's config; it must describe ``state_dict``.
        class_names: category id -> name for ``id2label`` (unnamed ids get ``N/A``, or ``LABEL_<id>`` when none
            is named).
        inference_size: ``(data.val_size, data.val_max_size)``; None: the config's defaults (800, 1333).
        overwrite: replace the transformers files an existing folder holds.

    Raises:
        ValueError: a backbone transformers does not build (not a ResNet or timm model) or would run otherwise
            (:func:`hf_backbone_differences`), options it cannot express (CoPE offsets, 2 feature levels,
            two-stage without box refinement, one decoder layer without two-stage), a state_dict that does not fit
            ``model_cfg``, or a key with no transformers counterpart.
        FileTargetError (a ValueError): ``folder`` is empty, a file, under a file, not writable, or holds a
            transformers model and ``overwrite`` is False.
    """
    _check_writable(model_cfg)
    _check_weights(state_dict, model_cfg)
    config = hf_config(model_cfg, class_names)
    if inference_size is None:
        defaults = DataConfig()
        inference_size = (defaults.val_size, defaults.val_max_size)
    preprocessor = preprocessor_config(*inference_size)
    folder = check_hf_destination(folder, overwrite)  # what cannot be written is named first, then where
    hf_state = original_to_hf(state_dict, learned_position_prefix())
    # safetensors refuses tensors sharing storage (tied heads, the q/k/v views of in_proj): store each one alone.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in hf_state.items()}
    from safetensors.torch import save

    weights = save(tensors, metadata={"format": "pt"})  # transformers refuses safetensors files without "format"
    # config.json last: a folder is recognised only once its config.json is there.
    files = {
        WEIGHT_NAMES[0]: weights,
        PREPROCESSOR_NAME: _json_bytes(preprocessor),
        CONFIG_NAME: _json_bytes(config),
    }
    _write_folder(folder, files)


def _json_bytes(content: Mapping[str, Any]) -> bytes:
    return (json.dumps(content, indent=2, sort_keys=True) + "\n").encode("utf-8")


def check_hf_destination(folder: str | os.PathLike, overwrite: bool = False) -> str:
    """Checks that a transformers folder can be written at ``folder`` before anything is read or converted; returns
    its absolute path.

    Raises:
        FileTargetError: ``folder`` is empty, a file, under a file or not writable; or it holds a transformers file
            (:data:`HF_FILES`) and ``overwrite`` is False (it is never replaced without being asked).
    """
    absolute = check_folder_target(folder, "the transformers folder")
    present = os.path.isdir(absolute)
    held = [name for name in HF_FILES if present and os.path.lexists(os.path.join(absolute, name))]
    if held and not overwrite:
        raise FileTargetError(
            f"{os.fspath(folder)} already holds {', '.join(held)}: not replaced (--overwrite, or overwrite=True, "
            "replaces them)"
        )
    return absolute


def _write_folder(folder: str, files: Mapping[str, bytes]) -> None:
    """Writes ``files`` (name -> content, in that order) into ``folder``: into an existing folder each file
    atomically; a new folder is assembled beside it and renamed, so it appears complete or not at all."""
    if os.path.isdir(folder):
        for name, content in files.items():
            atomic_write(os.path.join(folder, name), lambda f, content=content: f.write(content))
        return
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = staging_dir(parent, temp_prefix(folder))
    try:
        for name, content in files.items():
            atomic_write(os.path.join(tmp, name), lambda f, content=content: f.write(content))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
