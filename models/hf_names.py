"""State_dict key names: Hugging Face transformers' ``DeformableDetrForObjectDetection`` <-> the original's.

One table (:data:`NAME_PAIRS`) holds both directions. Its transformers side uses the names that transformers writes to
disk, which are also the names transformers 4.x uses in memory (the hub's ``SenseTime/deformable-detr*`` files):
``model.backbone.conv_encoder.model.*``, decoder ``self_attn.out_proj``, layers' ``fc1``/``fc2``. transformers 5.x
renames some modules in memory (``model.backbone.model.*``, ``self_attn.o_proj``, ``mlp.fc1``,
``model.position_embedding.*``); :func:`hf_to_original` accepts those too.

Not a pure renaming: the original's decoder self-attention is an ``nn.MultiheadAttention`` whose ``in_proj_weight``
``(3 * d, d)`` stacks the query, key and value projections in that order, where transformers has separate
``q_proj``/``k_proj``/``v_proj`` Linears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# Placeholders of the templates below and what each matches.
_GROUPS = {
    "i": r"\d+",
    "j": r"\d+",
    "p": r"weight|bias",
    "rest": r"[^\s]+",
    "top": r"reference_points|enc_output_norm|enc_output|pos_trans_norm|pos_trans",
    "attn": r"sampling_offsets|attention_weights|value_proj|output_proj",
}
_ENC = "model.encoder.layers.{i}."
_DEC = "model.decoder.layers.{i}."
_OUR_ENC = "transformer.encoder.layers.{i}."
_OUR_DEC = "transformer.decoder.layers.{i}."

# (transformers' on-disk name, the original's name); the same placeholder means the same text on both sides.
NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("model.backbone.conv_encoder.model.{rest}", "backbone.0.body.{rest}"),  # timm names == torchvision's for ResNet
    ("model.backbone.position_embedding.row_embeddings.weight", "backbone.1.row_embed.weight"),
    ("model.backbone.position_embedding.column_embeddings.weight", "backbone.1.col_embed.weight"),
    ("model.input_proj.{i}.{j}.{p}", "input_proj.{i}.{j}.{p}"),
    ("model.level_embed", "transformer.level_embed"),
    ("model.query_position_embeddings.weight", "query_embed.weight"),  # (Q, 2d): query_pos then tgt, as ours
    ("model.{top}.{p}", "transformer.{top}.{p}"),
    (_ENC + "self_attn.{attn}.{p}", _OUR_ENC + "self_attn.{attn}.{p}"),
    (_ENC + "self_attn_layer_norm.{p}", _OUR_ENC + "norm1.{p}"),
    (_ENC + "fc1.{p}", _OUR_ENC + "linear1.{p}"),
    (_ENC + "fc2.{p}", _OUR_ENC + "linear2.{p}"),
    (_ENC + "final_layer_norm.{p}", _OUR_ENC + "norm2.{p}"),
    (_DEC + "encoder_attn.{attn}.{p}", _OUR_DEC + "cross_attn.{attn}.{p}"),
    (_DEC + "encoder_attn_layer_norm.{p}", _OUR_DEC + "norm1.{p}"),  # after cross-attention
    (_DEC + "self_attn.out_proj.{p}", _OUR_DEC + "self_attn.out_proj.{p}"),
    (_DEC + "self_attn_layer_norm.{p}", _OUR_DEC + "norm2.{p}"),  # after self-attention
    (_DEC + "fc1.{p}", _OUR_DEC + "linear1.{p}"),
    (_DEC + "fc2.{p}", _OUR_DEC + "linear2.{p}"),
    (_DEC + "final_layer_norm.{p}", _OUR_DEC + "norm3.{p}"),
    ("class_embed.{i}.{p}", "class_embed.{i}.{p}"),
    ("bbox_embed.{i}.layers.{j}.{p}", "bbox_embed.{i}.layers.{j}.{p}"),
    ("model.decoder.class_embed.{i}.{p}", "transformer.decoder.class_embed.{i}.{p}"),  # two-stage alias
    ("model.decoder.bbox_embed.{i}.layers.{j}.{p}", "transformer.decoder.bbox_embed.{i}.layers.{j}.{p}"),  # refine
)
# transformers 5.x in-memory names -> the on-disk names above.
_V5_RENAMES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^model\.backbone\.model\."), "model.backbone.conv_encoder.model."),
    (re.compile(r"^model\.position_embedding\."), "model.backbone.position_embedding."),
    (re.compile(r"^(model\.(?:en|de)coder\.layers\.\d+)\.mlp\.(fc[12])\."), r"\1.\2."),
    (re.compile(r"^(model\.decoder\.layers\.\d+\.self_attn)\.o_proj\."), r"\1.out_proj."),
)
# The decoder self-attention's separate projections, in the order the original stacks them in in_proj_*.
QKV = ("q_proj", "k_proj", "v_proj")
_HF_QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)$")
_OUR_QKV = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$")
# timm ResNets are torchvision's networks with torchvision's parameter names; they map onto our torchvision backbones.
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Those whose torchvision network has basic blocks, which cannot dilate (DC5): a dilated one is timm's (output_stride).
BASIC_BLOCK_RESNETS = ("resnet18", "resnet34")
HEAD_PREFIXES = ("class_embed.", "bbox_embed.")
_OUR_DECODER = "transformer.decoder."
# transformers 5 writes the learned position embedding under its in-memory name (it has no rename for it).
V5_LEARNED_POSITION = "model.position_embedding."
V4_LEARNED_POSITION = "model.backbone.position_embedding."


def _compile(template: str) -> re.Pattern:
    """``"model.{top}.{p}"`` -> a regex with one named group per placeholder."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_GROUPS[part]})" for i, part in enumerate(parts))
    return re.compile(f"^{pattern}$")


_HF_TO_OURS = tuple((_compile(hf), ours) for hf, ours in NAME_PAIRS)
_OURS_TO_HF = tuple((_compile(ours), hf) for hf, ours in NAME_PAIRS)


def _translate(key: str, table: tuple[tuple[re.Pattern, str], ...]) -> str | None:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.format(**match.groupdict())
    return None


def normalise_hf_key(key: str) -> str:
    """A transformers key (4.x or 5.x naming, with or without the ``model.`` prefix of the detection model) -> its
    on-disk 4.x-style name with the prefix."""
    if not key.startswith(("model.", *HEAD_PREFIXES)):
        key = "model." + key  # saved from DeformableDetrModel, the detector without its top-level heads
    for pattern, replacement in _V5_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def hf_to_original_key(key: str) -> str | None:
    """The original's name of a transformers key; None for the fused q/k/v projections and unknown keys."""
    return _translate(normalise_hf_key(key), _HF_TO_OURS)


def original_to_hf_key(key: str) -> str | None:
    """The transformers (on-disk) name of one of the original's keys; None for ``in_proj_*`` and unknown keys."""
    return _translate(key, _OURS_TO_HF)


def hf_to_original(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Renames a transformers state_dict into the original's keys.

    BatchNorm ``num_batches_tracked`` counters are dropped (frozen BatchNorm has none). Where transformers stores a
    head only under its decoder alias (``model.decoder.class_embed.N`` / ``bbox_embed.N``: its tied-weight saving
    keeps one name), the top-level ``class_embed.N`` / ``bbox_embed.N`` is added as the same tensor, so the result
    always names the heads the original's way.

    Args:
        state: the file's tensors.
        source: the file, for error messages.

    Raises:
        ValueError: a key that maps to nothing (named with the file), an incomplete q/k/v triple, or two keys
            mapping to one name with different values.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith(".num_batches_tracked"):
            continue
        hf_key = normalise_hf_key(key)
        fused = _HF_QKV.match(hf_key)
        if fused:
            qkv.setdefault((fused[1], fused[3]), {})[fused[2]] = value
            continue
        ours = _translate(hf_key, _HF_TO_OURS)
        if ours is None:
            raise ValueError(
                f"{source}: key {key!r} has no counterpart in the original Deformable DETR (is this a "
                f"DeformableDetrForObjectDetection state_dict?)"
            )
        _put(out, ours, value, key, source)
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [name for name in QKV if name not in parts]
        if missing:
            raise ValueError(
                f"{source}: decoder layer {layer} self-attention has no {', '.join(missing)} {kind} "
                f"(needs all of q_proj, k_proj, v_proj)"
            )
        out[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat([parts[n] for n in QKV])
    _add_head_twins(out)
    return out


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors hold the same values: same shape and dtype, equal elementwise, NaN equal to NaN (two
    names of one tensor stay one tensor when its values are NaN; :func:`torch.equal` says they differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _put(out: dict[str, torch.Tensor], key: str, value: torch.Tensor, hf_key: str, source: str) -> None:
    """Sets ``out[key]``; two transformers names of one tensor (both naming conventions) must agree."""
    if key in out and not same_values(out[key], value):
        raise ValueError(f"{source}: {hf_key!r} and another key both map to {key!r} with different values")
    out[key] = value


def _add_head_twins(out: dict[str, torch.Tensor]) -> None:
    """``transformer.decoder.{class,bbox}_embed.*`` -> also ``{class,bbox}_embed.*`` when absent (same module in
    the original: two-stage registers the class heads there, box refinement the box heads)."""
    for key in [k for k in out if k.startswith(_OUR_DECODER) and k[len(_OUR_DECODER) :].startswith(HEAD_PREFIXES)]:
        out.setdefault(key[len(_OUR_DECODER) :], out[key])


def fill_tied_class_heads(out: dict[str, torch.Tensor], num_heads: int) -> list[str]:
    """Adds ``class_embed.1 .. num_heads-1`` as ``class_embed.0`` when the file has none of them; returns the keys
    added.

    transformers 5 ties every ``class_embed.N`` to ``class_embed.0`` (its ``_tied_weights_keys``) unless two-stage
    unties them, so ``save_pretrained`` of a box-refinement model writes ``class_embed.0`` only, and transformers 5
    runs each decoder layer with that one head. The original (and transformers 4, and the hub's files) has one head
    per layer; the caller fills them only for a box-refinement, not two-stage config (the only case where the
    original's heads are separate and transformers 5's tied) and only when every one of them is absent, so that a
    file holding some of them stays an error of the strict loader.
    """
    first = {p: out.get(f"class_embed.0.{p}") for p in ("weight", "bias")}
    if any(t is None for t in first.values()) or num_heads < 2:
        return []
    others = [f"class_embed.{i}.{p}" for i in range(1, num_heads) for p in first]
    if any(k in out for k in others):
        return []
    for key in others:
        out[key] = first[key.rsplit(".", 1)[1]]
    return others


def transformers_named_keys(keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that only transformers names so (``model.encoder.layers.0.fc1.weight``,
    ``model.backbone.conv_encoder...``, the decoder's ``q_proj``...), for telling a transformers weights file read
    without its ``config.json`` from a state_dict of another model. Keys both name alike (the top-level heads
    ``class_embed.N``, ``bbox_embed.N``) do not count."""
    found = []
    for key in keys:
        if not key.startswith("model."):
            continue
        hf_key = normalise_hf_key(key)
        if _HF_QKV.match(hf_key) or _translate(hf_key, _HF_TO_OURS) is not None:
            found.append(key)
    return found


def original_to_hf(
    state: Mapping[str, torch.Tensor], learned_position_prefix: str = V4_LEARNED_POSITION
) -> dict[str, torch.Tensor]:
    """Renames one of the original's state_dicts into transformers' on-disk keys.

    Every alias is kept (transformers ties them on loading, and files with all of them load in every version); the
    tensors are not copied, so aliases still share storage.

    Args:
        state: the original's keys.
        learned_position_prefix: where the learned position embedding goes, :data:`V4_LEARNED_POSITION` or
            :data:`V5_LEARNED_POSITION` (transformers 5 has no rename for it and reads only its own name).

    Raises:
        ValueError: a key with no transformers counterpart (named).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        fused = _OUR_QKV.match(key)
        if fused:
            for name, part in zip(QKV, value.chunk(3), strict=True):
                out[f"model.decoder.layers.{fused[1]}.self_attn.{name}.{fused[2]}"] = part
            continue
        hf_key = _translate(key, _OURS_TO_HF)
        if hf_key is None:
            raise ValueError(f"state_dict key {key!r} has no counterpart in transformers' Deformable DETR")
        if hf_key.startswith(V4_LEARNED_POSITION):
            hf_key = learned_position_prefix + hf_key[len(V4_LEARNED_POSITION) :]
        out[hf_key] = value
    return out


def backbone_from_hf(hf_config: Mapping[str, Any]) -> str:
    """Our ``backbone`` for config.json's: 4.x names a timm model in ``backbone`` (``use_timm_backbone``, the
    default), 5.x in ``backbone_config`` (``model_type: timm_backbone``).

    timm's ResNets map onto our torchvision ones (the same network and names), except a dilated (DC5, config.json's
    ``dilation``) ResNet-18/34: torchvision's basic blocks cannot dilate, so that one stays timm's (``timm/resnet18``).

    Raises:
        ValueError: a transformers-native backbone (``use_timm_backbone: false``), which names its layers otherwise.
    """
    sub = hf_config.get("backbone_config")
    if isinstance(sub, Mapping):
        timm, detail = sub.get("model_type") == "timm_backbone", f"backbone_config model_type {sub.get('model_type')!r}"
        name = sub.get("backbone") or "resnet50"
    else:
        timm, detail = (
            hf_config.get("use_timm_backbone", True),
            f"use_timm_backbone false, {hf_config.get('backbone')!r}",
        )
        name = hf_config.get("backbone") or "resnet50"  # transformers' default
    if not timm or not isinstance(name, str):
        raise ValueError(
            f"config.json's backbone is not supported ({detail}): only timm backbones (use_timm_backbone: true and a "
            f"timm model name such as 'resnet50') map onto this project's backbones"
        )
    architecture = name.split(".")[0]  # a pretrained tag (resnet50.a1_in1k) only names weights the file replaces
    if architecture in BASIC_BLOCK_RESNETS and hf_config.get("dilation"):
        return f"timm/{architecture}"
    return architecture if architecture in RESNETS else f"timm/{name}"


def hf_backbone(backbone: str) -> str:
    """The timm model name transformers builds for our ``backbone``."""
    if backbone in RESNETS:
        return backbone
    if backbone.startswith("timm/") and len(backbone) > len("timm/"):
        return backbone[len("timm/") :]
    raise ValueError(
        f"backbone {backbone!r} cannot be written for transformers: it builds timm backbones only "
        f"({', '.join(RESNETS)} or timm/<name>)"
    )


def learned_position_prefix() -> str:
    """transformers 5.x reads the learned position embedding only under its own name, 4.x only under the hub's."""
    try:
        import transformers
    except ImportError:
        return V4_LEARNED_POSITION
    return V5_LEARNED_POSITION if int(transformers.__version__.split(".")[0]) >= 5 else V4_LEARNED_POSITION
