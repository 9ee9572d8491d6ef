"""Checkpoints: one reader for every format a user may hold, one writer, and what a checkpoint says about its model.

:func:`read_checkpoint` reads, on the CPU and without unpickling anything but tensors and plain containers:

- ``project``: this project's checkpoint, ``{model, config, class_names, optimizer, lr_scheduler, epoch, ...}``;
- ``original``: the authors' release format, ``{model, optimizer, lr_scheduler, epoch, args}`` whose ``args`` is an
  ``argparse.Namespace`` (the one class allowed besides torch's own);
- ``state_dict``: a bare state_dict, or a dict whose only weights are its ``model`` entry (``.pth`` or
  ``.safetensors``);
- ``hf``: a Hugging Face transformers Deformable DETR folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), or one of those weight files with ``config.json`` beside it; names are mapped onto the
  original's state_dict (:mod:`models.hf_format`); a hub model id (``SenseTime/deformable-detr``) where no such
  local path exists is fetched into the hub cache and read as that folder (:mod:`models.hub`).

Whatever the format, the result is a :class:`Checkpoint`: the state_dict in the original's key names, the model
options the file states (its config, its ``args``, its ``config.json``, and what the weights' shapes show) and the
class names it carries. :func:`save_checkpoint` writes atomically (:mod:`models.files`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from .coco_classes import COCO_CLASSES
from .files import atomic_write
from .hf_names import same_values
from .hub import resolve_checkpoint

FORMATS = ("project", "original", "state_dict", "hf")
# transformers' weights file names in order of preference, read with config.json beside; an index.json lists the
# shards of a large save_pretrained (max_shard_size)
HF_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
# The other files of a transformers folder: a path to one of them reads the folder.
HF_FOLDER_FILES = ("config.json", "preprocessor_config.json")
RUN_CHECKPOINT = "checkpoint.pth"  # the latest checkpoint in a training run's output_dir
EXPECTED = (
    "expected this project's checkpoint, an original Deformable-DETR checkpoint (.pth with 'model' and 'args'), a "
    "state_dict, or a transformers folder (config.json + model.safetensors or pytorch_model.bin)"
)
# The first layer's deformable attention of the encoder and the decoder: its CoPE part (``.cope.``,
# deformable.cope_sampling.CoPESampling) is present with offset_mode "cope".
FIRST_ATTENTION = {
    "enc_offset_mode": "transformer.encoder.layers.0.self_attn",
    "dec_offset_mode": "transformer.decoder.layers.0.cross_attn",
}
# With box refinement the box heads are also the decoder's (one per layer): only such a model has these keys.
REFINE_PREFIX = "transformer.decoder.bbox_embed."
BOX_HEAD = re.compile(r"^bbox_embed\.(\d+)\.(.+)$")
# The torchvision ResNets by (blocks in layer1..layer4, bottleneck blocks): their keys under the detector's body.
RESNET_BLOCK = re.compile(r"^backbone\.0\.body\.layer([1-4])\.(\d+)\.")
RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
}
# ModelConfig fields an original checkpoint's argparse ``args`` carries under the same names.
ORIGINAL_ARGS = (
    "backbone",
    "dilation",
    "position_embedding",
    "num_feature_levels",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "hidden_dim",
    "dropout",
    "nheads",
    "num_queries",
    "enc_n_points",
    "dec_n_points",
    "with_box_refine",
    "two_stage",
    "aux_loss",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds, whatever its format.

    Attributes:
        path: the file or folder read.
        format: one of :data:`FORMATS`.
        model: the state_dict in the original's key names (a ``module.`` prefix removed).
        options: ``ModelConfig`` fields the checkpoint states, e.g. ``{"two_stage": True, "num_classes": 91}``.
        class_names: category id (the label) -> name, empty when the checkpoint has none.
        config: a project checkpoint's whole resolved config (a plain dict), else None.
        entries: the file's other top-level entries (``optimizer``, ``lr_scheduler``, ``epoch``, ``rng``, ...).
    """

    path: str
    format: str
    model: dict[str, torch.Tensor]
    options: dict[str, Any] = field(default_factory=dict)
    class_names: dict[int, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    entries: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint of any format in :data:`FORMATS` (see the module docstring).

    Raises:
        FileNotFoundError: no such file or folder (nor hub model).
        CheckpointError: corrupt, truncated or foreign content; the message names the file and what was expected.
    """
    path = run_folder_checkpoint(resolve_checkpoint(path))  # a hub id: its snapshot folder in the hub cache
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    beside = os.path.join(os.path.dirname(path), "config.json")
    if os.path.basename(path) in HF_FOLDER_FILES and os.path.isfile(beside):  # a file of the folder meant
        return _read_hf(os.path.dirname(path) or ".")
    if os.path.isdir(path) or (os.path.basename(path) in HF_WEIGHTS and os.path.isfile(beside)):
        return _read_hf(path)
    if path.endswith(".safetensors"):
        return _from_dict(_load_safetensors(path), path)
    return _from_dict(_torch_load(path), path)


def run_folder_checkpoint(path: str | os.PathLike) -> str:
    """A training run's folder (it holds this project's :data:`RUN_CHECKPOINT` and is no transformers folder: no
    ``config.json``) -> that file, as every tool, ``train.resume`` and ``train.finetune`` read it; any other path as
    it is."""
    path = os.fspath(path)
    latest = os.path.join(path, RUN_CHECKPOINT)
    if os.path.isdir(path) and os.path.isfile(latest) and not os.path.isfile(os.path.join(path, "config.json")):
        return latest
    return path


def torch_load(path: str, allowed: tuple[type, ...] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with the classes ``allowed`` besides tensors and plain
    containers (the original's release files need ``argparse.Namespace``).

    Raises:
        CheckpointError: the file holds other pickled objects (refused, never run: the message names the first one),
            or is no readable PyTorch file.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text advises turning weights_only off: not passed on
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path} holds pickled Python objects ({found.group(1)}) besides tensors: refused, not loaded (files "
                "are read with torch.load(weights_only=True), which unpickles tensors and plain containers only)"
            ) from exc
        reason = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        why = reason.group(1).strip() if reason else str(exc).splitlines()[0][:200]
        raise CheckpointError(f"{path} is corrupt or not a PyTorch file (UnpicklingError: {why})") from exc
    except Exception as exc:  # zip and format errors all mean "not a usable file"
        raise CheckpointError(
            f"{path} is corrupt or not a PyTorch file ({type(exc).__name__}: {str(exc)[:300]})"
        ) from exc


def _torch_load(path: str) -> Any:
    try:
        return torch_load(path, allowed=(argparse.Namespace,))
    except CheckpointError as exc:
        raise CheckpointError(f"checkpoint {exc}; {EXPECTED}") from exc


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for torn headers and data
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({exc}); {EXPECTED}") from exc


def _read_hf(path: str) -> Checkpoint:
    from . import hf_format  # imported here so that plain checkpoints never need transformers' layout code

    try:
        state, hf_config = hf_format.read_hf(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}; {EXPECTED}") from exc
    from_weights, from_config = options_from_weights(state), hf_format.model_overrides_from_hf(hf_config)
    held, listed = from_weights.get("num_classes"), from_config.get("num_classes")
    if held is not None and listed is not None and held != listed:
        raise CheckpointError(
            f"checkpoint {path}: config.json lists {listed} classes (id2label / num_labels) but its weights' class "
            f"head has {held}; the folder's files do not belong together"
        )
    try:
        names = hf_format.class_names_from_hf(hf_config)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: config.json {exc}") from exc
    beyond = [cat_id for cat_id in names if held is not None and not 0 <= cat_id < held]
    if beyond:
        raise CheckpointError(
            f"checkpoint {path}: config.json's id2label names class ids {', '.join(map(str, beyond))}, which the "
            f"weights' class head ({held} classes, ids 0..{held - 1}) cannot output; number id2label 0..{held - 1}"
        )
    return Checkpoint(path, "hf", state, {**from_weights, **from_config}, names)


# Where training code keeps the weights in a checkpoint dict (this project and the original: "model"; Lightning:
# "state_dict"; many scripts: "model_state_dict"; EMA-only files: "ema" / "model_ema"), in the order looked at.
STATE_ENTRIES = ("model", "state_dict", "model_state_dict", "ema", "model_ema")
# Prefixes wrappers put before every key: DistributedDataParallel and torch.optim.swa_utils.AveragedModel ("module."),
# torch.compile ("_orig_mod."), Lightning modules holding the detector as self.model ("model.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def state_dict_of(content: Any, path: str) -> dict[str, torch.Tensor]:
    """The state_dict in a loaded checkpoint: its first entry of :data:`STATE_ENTRIES` that is a dict, or the whole
    dict when every value is a tensor; wrapper prefixes (:data:`WRAPPER_PREFIXES`) that every key carries are
    removed, with ``AveragedModel``'s ``n_averaged`` counter.

    Raises:
        CheckpointError: no state_dict there (the file and the keys found named).
    """
    found = _describe(content)
    if isinstance(content, Mapping):
        entry = next((k for k in STATE_ENTRIES if isinstance(content.get(k), Mapping)), None)
        content = content[entry] if entry is not None else content
    if not isinstance(content, Mapping) or not content:
        raise CheckpointError(f"checkpoint {path} holds no 'model' state dict (found {found}); {EXPECTED}")
    bad = [str(k) for k, v in content.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds no 'model' state dict: entries {', '.join(bad[:8])} are not tensors; {EXPECTED}"
        )
    state = {str(k): v for k, v in content.items()}
    while True:
        keys = [k for k in state if k != "n_averaged"]
        prefix = next((p for p in WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            return state
        state = {k[len(prefix) :]: v for k, v in state.items() if k != "n_averaged"}


def _describe(content: Any) -> str:
    if isinstance(content, Mapping):
        return "keys " + (", ".join(map(str, list(content)[:10])) or "none")
    return f"a {type(content).__name__}"


def _from_dict(content: Any, path: str) -> Checkpoint:
    state = state_dict_of(content, path)
    if not (isinstance(content, Mapping) and isinstance(content.get("model"), Mapping)):
        return Checkpoint(path, "state_dict", state, options_from_weights(state))
    entries = {k: v for k, v in content.items() if k != "model"}
    options = options_from_weights(state)
    if isinstance(entries.get("config"), Mapping):
        config = dict(entries.pop("config"))
        options.update(config.get("model") or {})
        names = {int(k): str(v) for k, v in (entries.pop("class_names", None) or {}).items()}
        return Checkpoint(path, "project", state, options, names, config, entries)
    if isinstance(entries.get("args"), argparse.Namespace):
        args = vars(entries.pop("args"))
        options = {**{k: args[k] for k in ORIGINAL_ARGS if k in args}, **options}  # where they disagree, the weights
        coco = args.get("dataset_file", "coco") == "coco" and options.get("num_classes") == 91
        names = dict(COCO_CLASSES) if coco else {}
        return Checkpoint(path, "original", state, options, names, None, entries)
    return Checkpoint(path, "state_dict", state, options, {}, None, entries)


def options_from_weights(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``ModelConfig`` fields that a state_dict's keys and shapes show: class count, width, queries, levels,
    layer counts, feed-forward width, two-stage, box refinement (the decoder's box heads, or per-layer values), which
    torchvision ResNet the backbone is and its norm, and the offset modes (CoPE offsets have gate parameters; their
    counting channels, and the head count, hence each attention's points per head)."""
    options: dict[str, Any] = {}
    if "class_embed.0.bias" in state:
        options["num_classes"] = int(state["class_embed.0.bias"].shape[0])
    if "transformer.level_embed" in state:
        options["num_feature_levels"], options["hidden_dim"] = (int(n) for n in state["transformer.level_embed"].shape)
    if "query_embed.weight" in state:
        options["num_queries"] = int(state["query_embed.weight"].shape[0])
    for part, key in (("encoder", "enc_layers"), ("decoder", "dec_layers")):
        layers = {k.split(".")[3] for k in state if k.startswith(f"transformer.{part}.layers.")}
        if layers:
            options[key] = len(layers)
    if "transformer.encoder.layers.0.linear1.weight" in state:
        options["dim_feedforward"] = int(state["transformer.encoder.layers.0.linear1.weight"].shape[0])
    options["two_stage"] = "transformer.enc_output.weight" in state
    refine = _refinement_shown(state)
    if refine is not None:
        options["with_box_refine"] = refine
    resnet = _resnet_shown(state)
    if resnet is not None:
        options["backbone"] = resnet
    if "backbone.0.body.bn1.weight" in state:  # a ResNet's stem norm: frozen BatchNorm has statistics, GroupNorm none
        options["backbone_norm"] = "frozen_bn" if "backbone.0.body.bn1.running_mean" in state else "gn"
    for key, attention in FIRST_ATTENTION.items():
        if f"{attention}.sampling_offsets.weight" not in state:
            continue
        gate_query = state.get(f"{attention}.cope.gate_query")  # (M, R, G): R counting channels
        if gate_query is None:
            options[key] = "linear"
        else:
            options[key], options["cope_channels"] = "cope", int(gate_query.shape[1])
            options["nheads"] = int(gate_query.shape[0])  # M heads: a linear attention does not show them
    options.update(_points_shown(state, options))
    return options


def _points_shown(state: Mapping[str, torch.Tensor], options: Mapping[str, Any]) -> dict[str, int]:
    """``enc_n_points`` / ``dec_n_points`` where the head count is known (CoPE offsets show it): an attention's
    weights have M x L x P rows."""
    heads, levels = options.get("nheads"), options.get("num_feature_levels")
    shown = {}
    for key, attention in (
        ("enc_n_points", FIRST_ATTENTION["enc_offset_mode"]),
        ("dec_n_points", FIRST_ATTENTION["dec_offset_mode"]),
    ):
        weights = state.get(f"{attention}.attention_weights.weight")
        if heads and levels and weights is not None and weights.shape[0] % (heads * levels) == 0:
            shown[key] = int(weights.shape[0]) // (heads * levels)
    return shown


def box_refine_in_weights(state: Mapping[str, torch.Tensor]) -> bool:
    """True when a state_dict (the original's names) is a ``with_box_refine`` model's: its box heads are registered
    in the decoder too (``transformer.decoder.bbox_embed.*``), which only box refinement does."""
    return any(k.startswith(REFINE_PREFIX) for k in state)


def box_heads(state: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The top-level box heads of a state_dict: layer index -> {parameter name inside the head: tensor}."""
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = BOX_HEAD.match(key)
        if match:
            heads.setdefault(int(match[1]), {})[match[2]] = value
    return heads


def _resnet_shown(state: Mapping[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet (``resnet18`` .. ``resnet101``) whose blocks the backbone keys hold, else None (a timm
    backbone of another family, or none). A timm ResNet of the same depth has the same names and shapes."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        match = RESNET_BLOCK.match(key)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
    counts = tuple(len(blocks.get(layer, ())) for layer in (1, 2, 3, 4))
    return RESNET_DEPTHS.get((counts, "backbone.0.body.layer1.0.conv3.weight" in state))


def one_shared_head(heads: Mapping[int, Mapping[str, torch.Tensor]]) -> bool:
    """Whether the box heads of :func:`box_heads` hold the same parameters and values in every layer: one head
    shared by the decoder layers, as a model without box refinement saves it."""
    first = heads[min(heads)]
    return all(
        head.keys() == first.keys() and all(same_values(head[name], first[name]) for name in first)
        for head in heads.values()
    )


def _refinement_shown(state: Mapping[str, torch.Tensor]) -> bool | None:
    """Box refinement as the weights show it: the decoder's box-head names, or, saved without them, box heads whose
    values differ between layers (:func:`one_shared_head`). None when fewer than two box heads are there to
    compare."""
    if box_refine_in_weights(state):
        return True
    heads = box_heads(state)
    return None if len(heads) < 2 else not one_shared_head(heads)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save(state)`` to ``path`` atomically; ``state`` holds only tensors and plain Python values, so
    :func:`read_checkpoint` reads it back with ``weights_only=True``."""
    atomic_write(path, lambda f: torch.save(dict(state), f))


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies ``src`` to ``dst`` atomically (the periodic ``checkpoint_<epoch>.pth`` copies)."""

    def write(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f)

    atomic_write(dst, write)
