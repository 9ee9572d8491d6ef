"""Putting weights into a detector: the one strict loader, with class heads re-initialised for another class count.

Reading files (every format) is :mod:`models.checkpoint`'s; this module takes what it read, or a state_dict.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import (
    REFINE_PREFIX,
    Checkpoint,
    box_heads,
    box_refine_in_weights,
    one_shared_head,
    read_checkpoint,
    state_dict_of,
)
from .heads import reset_class_head
from .hf_names import same_values, transformers_named_keys

logger = logging.getLogger(__name__)

ENCODER_ATTENTION = "transformer.encoder.layers.0.self_attn"
DECODER_ATTENTION = "transformer.decoder.layers.0.cross_attn"
# Keys of the class heads, which legitimately differ in shape when fine-tuning on another class count.
CLASS_HEAD_KEY = re.compile(r"^(transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)$")
MAX_KEYS_SHOWN = 8


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did.

    Attributes:
        loaded: model keys set from the checkpoint.
        reinitialised: class-head keys whose checkpoint shape differed; those heads were re-initialised.
        missing: model keys the checkpoint lacked (only when ``strict=False``).
        unexpected: checkpoint keys the model lacks, ignored (only when ``strict=False``).
        mismatched: other keys whose shapes differ, ignored (only when ``strict=False``).
        fresh: CoPE gate keys the checkpoint had none of, left at their initialisation (only with ``fresh_cope``).
    """

    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> list[str]:
        """Checkpoint keys that were not used."""
        return self.reinitialised + self.unexpected + self.mismatched


def _state_of(source: str | os.PathLike | Mapping | Checkpoint) -> Mapping[str, torch.Tensor]:
    """The state_dict in ``source``: a path or :class:`Checkpoint` (read by :func:`models.checkpoint.read_checkpoint`),
    a dict with a ``model`` entry, or a state_dict."""
    if isinstance(source, (str, os.PathLike)):
        source = read_checkpoint(source)
    if isinstance(source, Checkpoint):
        return source.model
    if not isinstance(source, Mapping):
        raise TypeError(f"a checkpoint must be a path, a Checkpoint or a dict, got {type(source).__name__}")
    return state_dict_of(source, "the given dict")


def _refuse_transformers_names(state: Mapping[str, torch.Tensor]) -> None:
    """A transformers weights file read without its config.json is a state_dict in transformers' names, which fit
    no key of this detector: say what it is and what it needs instead of listing hundreds of missing keys."""
    named = transformers_named_keys(state)
    if state and len(named) * 2 > len(state):
        raise ValueError(
            f"these are transformers DeformableDetrForObjectDetection weights (keys named as transformers does, e.g. "
            f"{_show(named[:2])}), read without their config.json: put the config.json that came with them beside "
            f"the weights file (config.json + model.safetensors in one folder) and pass the folder"
        )


def _show(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    return shown + (f" and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else "")


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Groups of state_dict keys that are the same tensor (shared heads registered under several names)."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault((tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape)), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _refuse_non_finite(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """Weights holding NaN or inf (a diverged training) make a detector that outputs NaN: refused, the first such key
    named (only keys the model has; the strict loader reports the others)."""
    for key, value in state.items():
        if key in own and value.is_floating_point() and not torch.isfinite(value).all():
            count = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"the weight {key} holds {count} NaN/inf value(s) of {value.numel()}: a detector with these weights "
                "outputs NaN (did its training diverge?); use an earlier checkpoint"
            )


def _refuse_integer_weights(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """Integer values for a floating-point parameter (quantised weights: int8 without their scales) would be copied
    as numbers and make a detector that finds nothing, complex ones lose their imaginary part: refused, the first
    such key named."""
    for key, value in state.items():
        if key in own and own[key].is_floating_point() and not value.is_floating_point():
            raise ValueError(
                f"the weight {key} is {str(value.dtype).removeprefix('torch.')}, where the model has "
                f"{str(own[key].dtype).removeprefix('torch.')}: quantised weights cannot be loaded as they are; "
                "dequantise them (or load the floating-point checkpoint they were made from)"
            )


def _check_shared(state: Mapping, groups: list[list[str]], model_refines: bool) -> None:
    """A checkpoint with different values for keys the model shares was made by another architecture: a
    box-refinement one (separate heads per layer) when its keys say so and the model has shared heads."""
    for group in groups:
        present = [k for k in group if k in state]
        first = state[present[0]] if present else None
        if any(state[k].shape == first.shape and not same_values(state[k], first) for k in present[1:]):
            message = f"checkpoint has different values for {_show(present)}, which this model shares"
            if box_refine_in_weights(state) and not model_refines:
                raise ValueError(
                    f"{message}: the checkpoint has a box head per decoder layer ({REFINE_PREFIX}*), a box-refinement "
                    f"model; set model.with_box_refine=true"
                )
            raise ValueError(f"{message}; was it trained with another with_box_refine setting?")


def _check_box_refinement(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """A box-refinement model (a box head per decoder layer, ``transformer.decoder.bbox_embed.N`` aliases of
    ``bbox_embed.N``) refuses a checkpoint of a model without it: one box head shared by every layer, saved under each
    ``bbox_embed.N`` with the same values and without the decoder's names. The strict loader alone counts the model's
    heads covered through their aliases and loads it (fine-tuning may start a box-refinement model so), but the
    detector then refines boxes with heads not trained to: not the checkpoint's outputs. (A box-refinement checkpoint
    saved under the top-level names only has per-layer values: loaded.)"""
    if not box_refine_in_weights(own) or box_refine_in_weights(state):
        return
    mine, theirs = box_heads(own), box_heads(state)
    if len(mine) < 2 or set(theirs) != set(mine):
        return  # one layer shows nothing; other heads are the strict loader's to report
    if one_shared_head(theirs):
        raise ValueError(
            f"the checkpoint's box heads bbox_embed.0..{max(theirs)} are one head shared by every decoder layer (same "
            f"values, no {REFINE_PREFIX}* keys): a model without box refinement, which this box-refinement model "
            "would run differently; set model.with_box_refine=false"
        )


def _classify(state: Mapping, own: Mapping, groups: list[list[str]]) -> LoadResult:
    """Sorts the checkpoint keys into loadable, class heads to re-initialise, unexpected and mismatched; lists the
    model keys that nothing covers (a key is covered when any of its aliases is)."""
    result = LoadResult()
    for key, value in state.items():
        if key not in own:
            result.unexpected.append(key)
        elif value.shape == own[key].shape:
            result.loaded.append(key)
        elif CLASS_HEAD_KEY.match(key) and value.shape[1:] == own[key].shape[1:]:  # only the class count differs
            result.reinitialised.append(key)
        else:
            result.mismatched.append(f"{key} (checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)})")
    covered = set(result.loaded) | set(result.reinitialised)
    for group in groups:
        if covered & set(group):
            covered |= set(group)
    result.missing = [k for k in own if k not in covered]
    return result


def _cope_prefixes(model: nn.Module) -> list[str]:
    """State_dict prefixes of the CoPE parts (``<attention>.cope.``) of every ``offset_mode="cope"`` attention."""
    return [f"{name}.cope." for name, module in model.named_modules() if getattr(module, "offset_mode", None) == "cope"]


def _fresh_cope(result: LoadResult, state: Mapping, model: nn.Module) -> None:
    """Moves from ``result.missing`` to ``result.fresh`` the keys of CoPE parts the checkpoint has no key of: a CoPE
    part keeps its initialisation, where its attention is exactly the plain one, only whole (a checkpoint holding
    some of a part's keys and not others stays an error)."""
    for prefix in _cope_prefixes(model):
        if any(k.startswith(prefix) for k in state):
            continue
        result.fresh += [k for k in result.missing if k.startswith(prefix)]
    fresh = set(result.fresh)
    result.missing = [k for k in result.missing if k not in fresh]


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | Mapping | Checkpoint,
    strict: bool = True,
    reinit_class_heads: bool = True,
    fresh_cope: bool = False,
) -> LoadResult:
    """Loads weights into ``model``, re-initialising class heads whose class count differs.

    Args:
        model: the detector.
        source: a checkpoint path in any format :func:`models.checkpoint.read_checkpoint` reads (this project's, the
            original's, a state_dict, a transformers folder), what it returned, a dict with a ``model`` entry, or a
            state_dict.
        strict: when True (default) any other difference (missing or unexpected keys, other shapes) is an error,
            so a checkpoint of another architecture is never loaded partially; when False those keys are skipped
            and reported.
        reinit_class_heads: when False, class heads of another class count are an error too (evaluation, inference,
            export and resuming need the checkpoint's own heads), and so is a checkpoint without box refinement for a
            box-refinement model (its box heads shared by every decoder layer: other outputs than the checkpoint's
            model), which fine-tuning may start from.
        fresh_cope: CoPE offsets switched on over a checkpoint with linear ones (fine-tuning): the gate parameters of
            an ``offset_mode="cope"`` attention the checkpoint has no key of keep their initialisation, at which the
            attention is exactly the plain one, so the detector starts with the checkpoint's outputs.

    Returns:
        A :class:`LoadResult`; what was dropped is also logged.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable file, another architecture (the keys named), or
            NaN/inf weights (the first key named). TypeError: ``source`` is neither a path nor a dict.
    """
    state = _state_of(source)
    _refuse_transformers_names(state)
    groups = _alias_groups(model)
    own = model.state_dict()
    _refuse_integer_weights(state, own)
    _refuse_non_finite(state, own)
    _check_shared(state, groups, box_refine_in_weights(own))
    if not reinit_class_heads:  # the checkpoint's own model is wanted, not a start for fine-tuning
        _check_box_refinement(state, own)
    result = _classify(state, own, groups)
    if fresh_cope:
        _fresh_cope(result, state, model)
    if result.reinitialised and not reinit_class_heads:
        key = result.reinitialised[0]
        count = state[key].shape[0]
        raise ValueError(
            f"the checkpoint's class head {key} has {count} classes, the model {model.state_dict()[key].shape[0]}: "
            f"set model.num_classes={count}"
        )
    if strict and (result.missing or result.unexpected or result.mismatched):
        raise ValueError(_mismatch_message(result, state, own))

    model.load_state_dict({k: state[k] for k in result.loaded}, strict=False)
    heads = {k.rsplit(".", 1)[0] for k in result.reinitialised}
    for name in sorted(heads):
        reset_class_head(model.get_submodule(name))
    if result.dropped or result.missing:
        logger.warning(
            "load_checkpoint: re-initialised %s; ignored %s; missing %s",
            _show(result.reinitialised) or "nothing",
            _show(result.unexpected + result.mismatched) or "nothing",
            _show(result.missing) or "nothing",
        )
    if result.fresh:
        logger.warning(
            "load_checkpoint: CoPE offsets switched on over linear ones: %d gate tensors start where the attention is "
            "the plain one (%s)",
            len(result.fresh),
            _show(result.fresh),
        )
    return result


def _mismatch_message(result: LoadResult, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    parts = []
    if result.mismatched:
        parts.append(f"shape mismatches: {_show(result.mismatched)}")
    other_shape = {entry.split(" ", 1)[0] for entry in result.mismatched}
    missing = [key for key in result.missing if key not in other_shape]  # a key of another shape is not missing
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint: {_show(missing)}")
    if result.unexpected:
        parts.append(f"{len(result.unexpected)} unexpected keys: {_show(result.unexpected)}")
    if not result.loaded and not result.reinitialised:
        parts.insert(0, "it shares no key with this detector (not a Deformable DETR state_dict?)")
    return (
        "checkpoint does not fit this model (another architecture or config?): "
        + "; ".join(parts + _attention_hints(state, own))
        + ". Only class heads may differ (another class count): set the config options the checkpoint was made with "
        "(in Python, load_checkpoint(..., strict=False) loads what fits)."
    )


def _attention_hints(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> list[str]:
    """What the attention weights' shapes say: a deformable attention has ``nheads x levels x points`` attention
    weights per query, so where the checkpoint's differ from the model's, the product ``nheads x points`` it was made
    with, and the settings that give it (the shapes cannot tell heads from points)."""
    if "transformer.level_embed" not in state or "transformer.level_embed" not in own:
        return []
    levels, width = state["transformer.level_embed"].shape
    hints = []
    for points, attention in (("enc_n_points", ENCODER_ATTENTION), ("dec_n_points", DECODER_ATTENTION)):
        key = f"{attention}.attention_weights.weight"
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        product, mine = state[key].shape[0] // levels, own[key].shape[0] // own["transformer.level_embed"].shape[0]
        fits = [f"model.nheads={h} model.{points}={product // h}" for h in range(1, product + 1) if product % h == 0]
        fits = [fit for fit in fits if width % int(fit.split()[0].split("=")[1]) == 0][:4]
        hints.append(
            f"the checkpoint's {attention.split('.')[1]} attention has nheads x {points} = {product} (this model "
            f"{mine}): set {' or '.join(fits)}"
        )
    return hints
