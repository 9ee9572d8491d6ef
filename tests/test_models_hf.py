"""transformers' Deformable DETR <-> ours: key mapping, config.json, and prediction parity in both directions.

No weights are downloaded: both sides start from random weights, moved off their initial values by seeded noise so
that every parameter and buffer (BatchNorm statistics included) is exercised.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

import models
from models.checkpoint import CheckpointError, read_checkpoint
from models.coco_classes import COCO_CLASSES
from models.hf_format import (
    class_names_from_hf,
    is_hf_source,
    model_overrides_from_hf,
    read_hf,
    write_hf,
)
from models.hf_names import hf_to_original, hf_to_original_key, original_to_hf, original_to_hf_key
from models.loading import architecture_mismatches

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
VARIANTS = ["coco.yaml", "coco_single_scale.yaml", "coco_box_refine.yaml", "coco_two_stage.yaml"]
TOL = 1e-4
NOISE = 1e-6  # fp32 rounding differences between the two implementations' encoder scores (measured: ~1e-6)
# A small detector for the cases the official variants do not cover (learned positions, DC5, other widths).
TINY = [
    "model.hidden_dim=64",
    "model.dim_feedforward=96",
    "model.enc_layers=1",
    "model.dec_layers=2",
    "model.num_queries=12",
    "model.num_classes=5",
]


def load_cfg(name: str, *overrides: str) -> models.Config:
    return models.load_config(os.path.join(CONFIGS, name), ["model.pretrained_backbone=false", *overrides])


def hf_kwargs(m: models.ModelConfig) -> dict:
    """DeformableDetrConfig arguments describing ``m`` (written independently of models.hf_format)."""
    return dict(
        use_timm_backbone=True,
        backbone=m.backbone.removeprefix("timm/"),
        use_pretrained_backbone=False,
        dilation=m.dilation,
        num_labels=m.num_classes,
        d_model=m.hidden_dim,
        encoder_layers=m.enc_layers,
        decoder_layers=m.dec_layers,
        encoder_attention_heads=m.nheads,
        decoder_attention_heads=m.nheads,
        encoder_ffn_dim=m.dim_feedforward,
        decoder_ffn_dim=m.dim_feedforward,
        num_queries=m.num_queries,
        two_stage_num_proposals=m.num_queries,
        num_feature_levels=m.num_feature_levels,
        encoder_n_points=m.enc_n_points,
        decoder_n_points=m.dec_n_points,
        with_box_refine=m.with_box_refine,
        two_stage=m.two_stage,
        position_embedding_type=m.position_embedding,
        dropout=m.dropout,
        auxiliary_loss=m.aux_loss,
    )


def build_hf(m: models.ModelConfig, seed: int = 1) -> nn.Module:
    """transformers' detector for ``m``, every parameter and buffer perturbed; box-refinement class heads untied."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)  # its initialisation draws from the global generator
    hf = transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(**hf_kwargs(m)))
    if m.with_box_refine and not m.two_stage:
        # transformers 5 ties class_embed.N to class_embed.0 here; the original (and the hub's files) has one class
        # head per decoder layer, so give each its own values.
        for i in range(1, len(hf.class_embed)):
            hf.class_embed[i] = copy.deepcopy(hf.class_embed[0])
    return perturb(hf, seed=seed).eval()


def build_ours(cfg: models.Config, seed: int = 3) -> nn.Module:
    """Our detector for ``cfg``, initialised from ``seed`` and perturbed like :func:`build_hf`'s."""
    torch.manual_seed(seed)
    return perturb(models.build_detector(cfg), seed=seed).eval()


def perturb(module: nn.Module, seed: int) -> nn.Module:
    """Seeded noise on every parameter and buffer (shared ones once); running variances stay positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("running_var"):
                t.mul_(1 + 0.2 * torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.add_(0.02 * torch.randn(t.shape, generator=g))
    return module


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2 images 3x160x192; the second padded at the bottom and right. Mask True at padding (ours)."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 160, 192, generator=g)
    mask = torch.zeros(2, 160, 192, dtype=torch.bool)
    mask[1, 128:] = True
    mask[1, :, 150:] = True
    return images.masked_fill(mask[:, None], 0.0), mask


def assert_same_predictions(ours: nn.Module, hf: nn.Module) -> None:
    images, mask = batch()
    with torch.no_grad():
        a = ours.eval()(images, mask)
        b = hf.eval()(pixel_values=images, pixel_mask=(~mask).long())  # transformers: 1 at valid pixels
    if b.enc_outputs_class is None:
        torch.testing.assert_close(a["pred_logits"], b.logits, rtol=0, atol=TOL)
        torch.testing.assert_close(a["pred_boxes"], b.pred_boxes, rtol=0, atol=TOL)
        return
    # Two-stage: every encoder position's proposal, before any selection, matches position by position.
    torch.testing.assert_close(a["enc_outputs"]["pred_logits"], b.enc_outputs_class, rtol=0, atol=TOL)
    torch.testing.assert_close(a["enc_outputs"]["pred_boxes"], b.enc_outputs_coord_logits.sigmoid(), rtol=0, atol=TOL)
    # The queries are the top-k proposals in score order, and neighbouring scores of a few hundred random proposals
    # lie ~1e-6 apart, fp32 rounding noise: two exact implementations may order them differently. The decoder is
    # permutation-equivariant, so compare the predictions as sets, each query with its counterpart. Which proposals
    # are kept must not hang on noise: the seeds keep the k-th and (k+1)-th scores apart (or exactly tied, as the
    # identical proposals of padded and off-image positions are).
    top = b.enc_outputs_class[..., 0].topk(b.logits.shape[1] + 1, dim=1).values
    boundary = top[:, -2] - top[:, -1]
    assert ((boundary == 0) | (boundary > 100 * NOISE)).all(), f"top-k boundary within fp32 noise: {boundary}"
    for i in range(images.shape[0]):
        x = torch.cat([a["pred_logits"][i], a["pred_boxes"][i]], -1)
        y = torch.cat([b.logits[i], b.pred_boxes[i]], -1)
        cost = torch.cdist(x.double(), y.double(), p=float("inf"))  # max-abs difference of every pair
        rows, cols = linear_sum_assignment(cost.numpy())
        assert cost[rows, cols].max().item() <= TOL, f"image {i}: a query differs by {cost[rows, cols].max():.2e}"


# -- the official variants, both directions -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_folder_loads_strictly_and_predicts_the_same(variant: str, tmp_path) -> None:
    cfg = load_cfg(variant)
    hf = build_hf(cfg.model)
    hf.save_pretrained(tmp_path)
    assert is_hf_source(tmp_path) and is_hf_source(tmp_path / "model.safetensors")

    state, hf_config = read_hf(tmp_path)
    assert hf_config["model_type"] == "deformable_detr"
    ours = models.build_detector(cfg)
    result = models.load_checkpoint(ours, state)  # strict
    assert not result.missing and not result.unexpected and not result.reinitialised
    assert_same_predictions(ours, hf)


@pytest.mark.parametrize("variant", VARIANTS)
def test_write_hf_round_trips_through_from_pretrained(variant: str, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = load_cfg(variant)
    ours = build_ours(cfg)
    write_hf(tmp_path / "out", ours.state_dict(), cfg.model, COCO_CLASSES)

    hf, info = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_predictions(ours, hf)
    assert class_names_from_hf(hf.config.to_dict()) == COCO_CLASSES
    # And back: our own reader gives the same state_dict.
    state, hf_config = read_hf(tmp_path / "out")
    fresh = models.build_detector(cfg)
    models.load_checkpoint(fresh, state)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert not architecture_mismatches(cfg.model, model_overrides_from_hf(hf_config))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.position_embedding=learned", "model.backbone=resnet18"],
        ["model.dilation=true", "model.num_feature_levels=1"],
        ["model.backbone=timm/resnet18", "model.num_feature_levels=3", "model.with_box_refine=true"],
    ],
    ids=["learned-resnet18", "dc5-single-scale", "timm-resnet18-3-levels-refine"],
)
def test_small_variants_both_directions(overrides: list[str], tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = load_cfg("coco.yaml", *TINY, *overrides)
    hf = build_hf(cfg.model)
    hf.save_pretrained(tmp_path / "hf")
    ours = models.build_detector(cfg)
    models.load_checkpoint(ours, read_hf(tmp_path / "hf")[0])
    assert_same_predictions(ours, hf)

    ours = build_ours(cfg)
    write_hf(tmp_path / "ours", ours.state_dict(), cfg.model)
    back, info = transformers.DeformableDetrForObjectDetection.from_pretrained(
        tmp_path / "ours", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_predictions(ours, back)


def test_one_decoder_layer_is_written_only_for_two_stage(tmp_path) -> None:
    """transformers 5 ties bbox_embed.1.. to bbox_embed.0 and cannot build a detector with one decoder layer (one box
    head), not even from its own config, so write_hf refuses it; two-stage has a second head and round-trips."""
    transformers = pytest.importorskip("transformers")
    one = load_cfg("coco_box_refine.yaml", *TINY, "model.dec_layers=1")
    # When this stops raising, transformers builds it: _check_writable's refusal can go.
    with pytest.raises(ValueError, match="tie_weights_keys"):
        transformers.DeformableDetrForObjectDetection(transformers.DeformableDetrConfig(**hf_kwargs(one.model)))
    with pytest.raises(ValueError, match=r"dec_layers=1 cannot be written for transformers \(unless two_stage\)"):
        write_hf(tmp_path / "one", build_ours(one).state_dict(), one.model)
    assert not (tmp_path / "one").exists()

    cfg = load_cfg("coco_two_stage.yaml", *TINY, "model.dec_layers=1")
    ours = build_ours(cfg)
    write_hf(tmp_path / "two_stage", ours.state_dict(), cfg.model)
    hf, info = transformers.DeformableDetrForObjectDetection.from_pretrained(
        tmp_path / "two_stage", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_predictions(ours, hf)


def test_in_memory_names_and_pytorch_model_bin(tmp_path) -> None:
    """transformers 5's in-memory names (mlp.fc1, o_proj, backbone.model) and a .bin file read the same."""
    cfg = load_cfg("coco.yaml", *TINY, "model.position_embedding=learned", "model.backbone=resnet18")
    hf = build_hf(cfg.model)
    hf.config.to_json_file(str(tmp_path / "config.json"))
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert is_hf_source(tmp_path) and is_hf_source(tmp_path / "pytorch_model.bin")
    for source in (tmp_path, tmp_path / "pytorch_model.bin"):
        ours = models.build_detector(cfg)
        models.load_checkpoint(ours, read_hf(source)[0])
        assert_same_predictions(ours, hf)


def test_base_model_keys_without_prefix() -> None:
    """A DeformableDetrModel state_dict (no ``model.`` prefix, no top-level heads) maps onto the same names."""
    cfg = load_cfg("coco.yaml", *TINY)
    hf = build_hf(cfg.model)
    with_prefix = hf_to_original(hf.state_dict(), "full")
    without = hf_to_original(hf.model.state_dict(), "base")
    assert without and set(without) <= set(with_prefix)
    assert {k for k in with_prefix if k not in without} == {
        k for k in with_prefix if k.startswith(("class_embed.", "bbox_embed."))
    }


# -- names ----------------------------------------------------------------------------------------------------------


def test_official_keys_round_trip_through_names(official_keys) -> None:
    for variant in official_keys.values():
        shapes = {k: torch.zeros(v) for k, v in variant["state_dict"].items()}
        hf = original_to_hf(shapes)
        assert not any(k.endswith("in_proj_weight") for k in hf)
        back = hf_to_original(hf, "test")
        assert set(back) == set(shapes)
        assert all(back[k].shape == shapes[k].shape for k in shapes)


@pytest.mark.parametrize(
    ("hf_key", "ours"),
    [
        (
            "model.backbone.conv_encoder.model.layer2.0.downsample.1.running_var",
            "backbone.0.body.layer2.0.downsample.1.running_var",
        ),
        ("model.backbone.model.conv1.weight", "backbone.0.body.conv1.weight"),  # transformers 5 in memory
        ("model.position_embedding.row_embeddings.weight", "backbone.1.row_embed.weight"),  # 5.x
        ("model.backbone.position_embedding.column_embeddings.weight", "backbone.1.col_embed.weight"),  # 4.x
        ("model.input_proj.3.1.bias", "input_proj.3.1.bias"),
        ("model.query_position_embeddings.weight", "query_embed.weight"),
        ("model.reference_points.weight", "transformer.reference_points.weight"),
        ("model.enc_output_norm.bias", "transformer.enc_output_norm.bias"),
        ("model.pos_trans_norm.weight", "transformer.pos_trans_norm.weight"),
        ("model.encoder.layers.2.self_attn_layer_norm.weight", "transformer.encoder.layers.2.norm1.weight"),
        ("model.encoder.layers.2.mlp.fc1.weight", "transformer.encoder.layers.2.linear1.weight"),
        ("model.encoder.layers.2.final_layer_norm.bias", "transformer.encoder.layers.2.norm2.bias"),
        (
            "model.decoder.layers.1.encoder_attn.sampling_offsets.bias",
            "transformer.decoder.layers.1.cross_attn.sampling_offsets.bias",
        ),
        ("model.decoder.layers.1.encoder_attn_layer_norm.weight", "transformer.decoder.layers.1.norm1.weight"),
        ("model.decoder.layers.1.self_attn_layer_norm.weight", "transformer.decoder.layers.1.norm2.weight"),
        ("model.decoder.layers.1.self_attn.o_proj.bias", "transformer.decoder.layers.1.self_attn.out_proj.bias"),
        ("model.decoder.layers.1.fc2.bias", "transformer.decoder.layers.1.linear2.bias"),
        ("model.decoder.layers.1.final_layer_norm.bias", "transformer.decoder.layers.1.norm3.bias"),
        ("model.decoder.bbox_embed.6.layers.2.bias", "transformer.decoder.bbox_embed.6.layers.2.bias"),
        ("model.decoder.class_embed.6.weight", "transformer.decoder.class_embed.6.weight"),
        ("class_embed.6.weight", "class_embed.6.weight"),
    ],
)
def test_key_pairs(hf_key: str, ours: str) -> None:
    assert hf_to_original_key(hf_key) == ours
    back = original_to_hf_key(ours)
    assert back is not None and hf_to_original_key(back) == ours


def test_decoder_self_attention_is_split_and_fused_in_q_k_v_order() -> None:
    weight = torch.arange(12.0).reshape(6, 2)
    hf = original_to_hf({"transformer.decoder.layers.0.self_attn.in_proj_weight": weight})
    assert torch.equal(hf["model.decoder.layers.0.self_attn.q_proj.weight"], weight[:2])
    assert torch.equal(hf["model.decoder.layers.0.self_attn.k_proj.weight"], weight[2:4])
    assert torch.equal(hf["model.decoder.layers.0.self_attn.v_proj.weight"], weight[4:])
    assert torch.equal(hf_to_original(hf, "x")["transformer.decoder.layers.0.self_attn.in_proj_weight"], weight)


def test_tied_heads_saved_once_are_named_both_ways() -> None:
    head = torch.ones(3)
    state = hf_to_original(
        {"model.decoder.class_embed.2.bias": head, "model.backbone.model.bn1.num_batches_tracked": torch.tensor(1)}, "x"
    )
    assert state == {"transformer.decoder.class_embed.2.bias": head, "class_embed.2.bias": head}


# -- config.json ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_overrides_rebuild_the_config(variant: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = load_cfg(variant)
    hf_config = transformers.DeformableDetrConfig(**hf_kwargs(cfg.model)).to_dict()
    rebuilt = models.load_config(None)
    for key, value in model_overrides_from_hf(hf_config).items():
        setattr(rebuilt.model, key, value)
    assert rebuilt.model == cfg.model
    assert architecture_mismatches(cfg.model, model_overrides_from_hf(hf_config)) == []


def test_overrides_from_hub_style_config() -> None:
    """The hub's 4.x layout (use_timm_backbone + backbone); two-stage takes two_stage_num_proposals queries."""
    hub = {
        "model_type": "deformable_detr",
        "use_timm_backbone": True,
        "backbone": "resnet50",
        "two_stage": True,
        "with_box_refine": True,
        "num_queries": 100,
        "two_stage_num_proposals": 300,
        "id2label": {"0": "N/A", "1": "person", "2": "bicycle"},
    }
    overrides = model_overrides_from_hf(hub)
    assert overrides["num_queries"] == 300 and overrides["two_stage"] and overrides["backbone"] == "resnet50"
    assert overrides["num_classes"] == 3 and overrides["pretrained_backbone"] is False
    assert overrides["hidden_dim"] == 256 and "aux_loss" not in overrides  # training choice, not architecture
    assert model_overrides_from_hf({**hub, "backbone": "convnext_tiny"})["backbone"] == "timm/convnext_tiny"
    assert model_overrides_from_hf({**hub, "backbone": "resnet50.a1_in1k"})["backbone"] == "resnet50"
    v5 = {"model_type": "deformable_detr", "backbone_config": {"model_type": "timm_backbone", "backbone": "resnet101"}}
    assert model_overrides_from_hf(v5)["backbone"] == "resnet101"


def test_mismatch_messages_name_both_values_and_the_override() -> None:
    cfg = load_cfg("coco.yaml")
    hf_config = {
        "model_type": "deformable_detr",
        "num_queries": 100,
        "with_box_refine": True,
        "backbone": "resnet101",
        "auxiliary_loss": True,
        "dropout": 0.0,
        "id2label": {str(i): f"LABEL_{i}" for i in range(20)},
    }
    assert architecture_mismatches(cfg.model, model_overrides_from_hf(hf_config)) == [
        "backbone: the config says 'resnet50', the checkpoint 'resnet101' (override: model.backbone=resnet101)",
        "num_queries: the config says 300, the checkpoint 100 (override: model.num_queries=100)",
        "with_box_refine: the config says False, the checkpoint True (override: model.with_box_refine=true)",
    ]  # num_classes (20 vs 91), dropout and aux_loss are not architecture mismatches
    cope = load_cfg("coco.yaml", "model.enc_offset_mode=cope")
    hub = {"model_type": "deformable_detr", "auxiliary_loss": True}
    assert architecture_mismatches(cope.model, model_overrides_from_hf(hub)) == [
        "enc_offset_mode: the config says 'cope', the checkpoint 'linear' (override: model.enc_offset_mode=linear)"
    ]


def test_class_names_skip_unused_ids_and_all_placeholder_labels() -> None:
    # an unnamed class beside named ones keeps transformers' placeholder as its name (its detections are shown)
    assert class_names_from_hf({"id2label": {"0": "N/A", "1": "person", "2": "LABEL_2", "3": "dog"}}) == {
        1: "person",
        2: "LABEL_2",
        3: "dog",
    }
    assert class_names_from_hf({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}) == {}
    assert class_names_from_hf({"id2label": {"0": "N/A", "1": "LABEL_1"}}) == {}
    assert class_names_from_hf({}) == {}


def test_written_config_is_the_hub_layout(tmp_path) -> None:
    cfg = load_cfg("coco_two_stage.yaml", *TINY)
    write_hf(tmp_path, models.build_detector(cfg).state_dict(), cfg.model, {1: "cat"})
    with open(tmp_path / "config.json", encoding="utf-8") as f:
        written = json.load(f)
    assert written["model_type"] == "deformable_detr"
    assert written["architectures"] == ["DeformableDetrForObjectDetection"]
    assert written["use_timm_backbone"] is True and written["backbone"] == "resnet50"
    assert written["use_pretrained_backbone"] is False
    assert written["id2label"]["1"] == "cat" and written["id2label"]["0"] == "N/A" and len(written["id2label"]) == 5
    assert written["label2id"]["cat"] == 1
    assert class_names_from_hf(written) == {1: "cat"}  # read back: the unused ids stay unused
    overrides = model_overrides_from_hf(written)
    assert (overrides["num_queries"], overrides["num_classes"], overrides["hidden_dim"]) == (12, 5, 64)
    # no temporary files left
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_write_hf_without_transformers_writes_the_same_keys(tmp_path, monkeypatch) -> None:
    import builtins

    cfg = load_cfg("coco_single_scale.yaml", *TINY)
    state = models.build_detector(cfg).state_dict()
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("no transformers here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    write_hf(tmp_path, state, cfg.model)
    monkeypatch.undo()
    read_state, written = read_hf(tmp_path)
    assert written["architectures"] == ["DeformableDetrForObjectDetection"] and written["use_timm_backbone"] is True
    assert model_overrides_from_hf(written)["num_feature_levels"] == 1
    models.load_checkpoint(models.build_detector(cfg), read_state)


def _tiny_hf_config(**options) -> dict:
    return dict(
        use_timm_backbone=True,
        backbone="resnet18",
        use_pretrained_backbone=False,
        d_model=64,
        encoder_layers=1,
        decoder_layers=3,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        num_queries=12,
        two_stage_num_proposals=12,
        num_labels=5,
        **options,
    )


def test_transformers_5_box_refine_save_with_tied_class_heads_loads(tmp_path) -> None:
    """transformers 5 ties class_embed.N to class_embed.0 in a box-refinement (not two-stage) model and saves only
    class_embed.0: the folder loads strictly, every layer's class head that one, and predicts what transformers
    predicts."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    hf = transformers.DeformableDetrForObjectDetection(
        transformers.DeformableDetrConfig(**_tiny_hf_config(with_box_refine=True))
    )
    perturb(hf, seed=1).eval()
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "model.safetensors")
    if "class_embed.1.weight" in saved:
        pytest.skip(f"transformers {transformers.__version__} saves every class head (no tying to reproduce)")
    cfg = load_cfg("coco_box_refine.yaml", *TINY, "model.backbone=resnet18", "model.dec_layers=3")
    ours, _ = models.load_detector(cfg, tmp_path)  # strict, as every tool loads
    for i in range(1, 3):
        assert torch.equal(ours.class_embed[i].weight, saved["class_embed.0.weight"])
    assert_same_predictions(ours, hf)


def test_tied_class_heads_are_filled_only_for_box_refinement_and_only_when_all_are_absent(tmp_path) -> None:
    """Without transformers: a written box-refinement folder with class_embed.1.. removed (what transformers 5
    saves) reads with class_embed.0 in their place; one of them left, or another model, is not filled."""
    from safetensors.torch import load_file, save_file

    cfg = load_cfg("coco_box_refine.yaml", *TINY)
    write_hf(tmp_path / "hf", build_ours(cfg).state_dict(), cfg.model)
    path = str(tmp_path / "hf" / "model.safetensors")
    full = load_file(path)
    tied = {k: v for k, v in full.items() if not (k.startswith("class_embed.") and not k.startswith("class_embed.0."))}
    save_file(tied, path, metadata={"format": "pt"})
    state, _ = read_hf(tmp_path / "hf")
    assert torch.equal(state["class_embed.1.bias"], full["class_embed.0.bias"])
    models.load_checkpoint(models.build_detector(cfg), state)  # strict

    save_file({**tied, "class_embed.1.bias": full["class_embed.1.bias"]}, path, metadata={"format": "pt"})
    assert "class_embed.1.weight" not in read_hf(tmp_path / "hf")[0]  # some present: left to the strict loader
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    save_file(tied, path, metadata={"format": "pt"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "with_box_refine": False}))
    assert "class_embed.1.weight" not in read_hf(tmp_path / "hf")[0]  # not box refinement: nothing filled


def test_read_checkpoint_takes_the_folder(tmp_path) -> None:
    """models.read_checkpoint (every tool's reader) recognises the folder and states its options and names."""
    cfg = load_cfg("coco_box_refine.yaml", *TINY)
    write_hf(tmp_path, models.build_detector(cfg).state_dict(), cfg.model, {1: "cat", 4: "dog"})
    checkpoint = models.read_checkpoint(tmp_path)
    assert checkpoint.format == "hf" and checkpoint.class_names == {1: "cat", 4: "dog"}
    assert checkpoint.options["with_box_refine"] and checkpoint.options["num_queries"] == 12
    models.load_checkpoint(models.build_detector(cfg), checkpoint)


def test_a_written_folder_has_the_permissions_of_a_made_folder(tmp_path) -> None:
    """Assembled in a temporary folder (private, 0700) and renamed: a serving process of another user can read it."""
    cfg = load_cfg("coco.yaml", *TINY)
    os.makedirs(tmp_path / "reference")
    write_hf(tmp_path / "hf", models.build_detector(cfg).state_dict(), cfg.model)
    assert os.stat(tmp_path / "hf").st_mode & 0o777 == os.stat(tmp_path / "reference").st_mode & 0o777


def test_a_path_to_the_folders_config_json_reads_the_folder(tmp_path) -> None:
    """config.json (or preprocessor_config.json) of a folder is taken as the folder, not unpickled as weights."""
    cfg = load_cfg("coco.yaml", *TINY)
    write_hf(tmp_path, models.build_detector(cfg).state_dict(), cfg.model, {1: "cat"})
    for name in ("config.json", "preprocessor_config.json"):
        checkpoint = models.read_checkpoint(tmp_path / name)
        assert checkpoint.format == "hf" and checkpoint.class_names == {1: "cat"}


def test_a_transformers_folder_fine_tuned_with_cope_starts_with_its_predictions(tmp_path) -> None:
    """train.finetune of a transformers folder with CoPE offsets switched on: the added gates start where the
    detector predicts exactly what transformers' does."""
    from deformable.training.build import finetune_from

    cfg = load_cfg("coco.yaml", *TINY)
    hf = build_hf(cfg.model)
    hf.save_pretrained(tmp_path)
    cope = load_cfg(
        "coco.yaml", *TINY, "model.enc_offset_mode=cope", "model.dec_offset_mode=cope", f"train.finetune={tmp_path}"
    )
    ours = models.build_detector(cope)
    finetune_from(ours, cope)
    assert all(m.offset_mode == "cope" for m in ours.modules() if hasattr(m, "offset_mode"))
    assert_same_predictions(ours, hf)


# -- errors ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_folder(tmp_path):
    """A valid folder written by write_hf from the tiny multi-scale model."""
    cfg = load_cfg("coco.yaml", *TINY)
    write_hf(tmp_path / "hf", models.build_detector(cfg).state_dict(), cfg.model)
    return tmp_path / "hf"


def test_folder_without_weights(tiny_folder) -> None:
    os.remove(tiny_folder / "model.safetensors")
    assert not is_hf_source(tiny_folder)
    with pytest.raises(FileNotFoundError, match="has no model.safetensors or pytorch_model.bin"):
        read_hf(tiny_folder)


def test_weights_without_config(tiny_folder) -> None:
    os.remove(tiny_folder / "config.json")
    assert not is_hf_source(tiny_folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_hf(tiny_folder / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hf(tiny_folder / "nothing")


@pytest.mark.parametrize("keep", [1000, -100], ids=["torn-header", "torn-data"])
def test_truncated_safetensors(tiny_folder, keep: int) -> None:
    path = tiny_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or not a safetensors file"):
        read_hf(tiny_folder)


def test_sharded_folder_reads_as_one(tiny_folder, tmp_path) -> None:
    """save_pretrained(max_shard_size=...) writes model.safetensors.index.json and shards: read as one state_dict."""
    from safetensors.torch import load_file, save_file

    whole = load_file(tiny_folder / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tiny_folder / "config.json").read_text())
    keys = sorted(whole)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: whole[k].contiguous() for k in part}, str(sharded / name))
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    expected, got = read_hf(tiny_folder)[0], read_hf(sharded)[0]
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    os.remove(sharded / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors does not exist \(a shard"):
        read_hf(sharded)


def test_pickled_objects_are_refused_and_named(tiny_folder) -> None:
    os.remove(tiny_folder / "model.safetensors")
    torch.save({"weight": torch.ones(1), "payload": Path("ran")}, tiny_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as error:
        read_hf(tiny_folder)
    message = str(error.value)
    assert "holds pickled Python objects (pathlib" in message and "refused, not loaded" in message
    assert "weights_only set to False" not in message  # torch's advice to turn the protection off is not passed on


def test_config_and_weights_disagreeing_on_the_classes(tiny_folder) -> None:
    config = json.loads((tiny_folder / "config.json").read_text())
    held = read_checkpoint(tiny_folder).options["num_classes"]
    labels = {str(i): f"c{i}" for i in range(held + 1)}
    (tiny_folder / "config.json").write_text(json.dumps({**config, "id2label": labels, "num_labels": held + 1}))
    with pytest.raises(CheckpointError, match=rf"lists {held + 1} classes .* class head has {held}"):
        read_checkpoint(tiny_folder)
    gaps = {**{str(i): f"c{i}" for i in range(held - 1)}, str(held + 4): "far"}  # as many names, one id too large
    (tiny_folder / "config.json").write_text(json.dumps({**config, "id2label": gaps, "num_labels": held}))
    with pytest.raises(CheckpointError, match=rf"id2label names class ids {held + 4}, which the weights' class head"):
        read_checkpoint(tiny_folder)
    labels = {**{str(i): f"c{i}" for i in range(held - 1)}, "cat": "cat"}
    (tiny_folder / "config.json").write_text(json.dumps({**config, "id2label": labels, "num_labels": held}))
    with pytest.raises(CheckpointError, match=r"id2label must map class indices to names, got the key 'cat'"):
        read_checkpoint(tiny_folder)


def test_corrupt_pytorch_model_bin(tiny_folder) -> None:
    os.remove(tiny_folder / "model.safetensors")
    (tiny_folder / "pytorch_model.bin").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is corrupt or not a PyTorch file"):
        read_hf(tiny_folder)


def test_config_of_another_model(tiny_folder) -> None:
    (tiny_folder / "config.json").write_text(json.dumps({"model_type": "detr"}))
    with pytest.raises(CheckpointError, match="model_type 'detr', expected 'deformable_detr'"):
        read_hf(tiny_folder)
    (tiny_folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not readable JSON"):
        read_hf(tiny_folder)


def test_unmappable_key_is_named_with_the_file(tiny_folder) -> None:
    from safetensors.torch import load_file, save_file

    path = str(tiny_folder / "model.safetensors")
    state = load_file(path)
    save_file({**state, "model.extra_head.weight": torch.zeros(2)}, path, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: key 'model\.extra_head\.weight' has no counterpart"
    ):
        read_hf(tiny_folder)


def test_incomplete_self_attention_projections() -> None:
    with pytest.raises(ValueError, match="decoder layer 0 self-attention has no k_proj, v_proj weight"):
        hf_to_original({"model.decoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}, "file.safetensors")


def test_unsupported_backbones(tiny_folder) -> None:
    config = json.loads((tiny_folder / "config.json").read_text())
    (tiny_folder / "config.json").write_text(json.dumps({**config, "use_timm_backbone": False}))
    with pytest.raises(CheckpointError, match="backbone is not supported .*only timm backbones"):
        read_hf(tiny_folder)
    v5_native = {"model_type": "deformable_detr", "backbone_config": {"model_type": "resnet"}}
    with pytest.raises(ValueError, match="backbone_config model_type 'resnet'"):
        model_overrides_from_hf(v5_native)
    cfg = load_cfg("coco.yaml", *TINY)
    state = models.build_detector(cfg).state_dict()
    cfg.model.backbone = "vgg16"
    with pytest.raises(ValueError, match="backbone 'vgg16' cannot be written for transformers"):
        write_hf(tiny_folder, state, cfg.model)


def test_options_transformers_cannot_express() -> None:
    with pytest.raises(ValueError, match="encoder_attention_heads=8 but decoder_attention_heads=4"):
        model_overrides_from_hf({"model_type": "deformable_detr", "decoder_attention_heads": 4})
    with pytest.raises(ValueError, match="encoder_ffn_dim=1024 but decoder_ffn_dim=2048"):
        model_overrides_from_hf({"model_type": "deformable_detr", "decoder_ffn_dim": 2048})
    with pytest.raises(ValueError, match="activation_function 'gelu' is not supported"):
        model_overrides_from_hf({"model_type": "deformable_detr", "activation_function": "gelu"})


def test_write_hf_refuses_what_transformers_cannot_build(tmp_path) -> None:
    cfg = load_cfg("coco.yaml", *TINY)
    state = models.build_detector(cfg).state_dict()
    cope = load_cfg("coco.yaml", *TINY, "model.dec_offset_mode=cope").model
    with pytest.raises(ValueError, match=r"^model.dec_offset_mode=cope \(CoPE offsets\) cannot be written"):
        write_hf(tmp_path, state, cope)
    both = load_cfg("coco.yaml", *TINY, "model.enc_offset_mode=cope", "model.dec_offset_mode=cope").model
    with pytest.raises(ValueError, match=r"^model.enc_offset_mode=cope and model.dec_offset_mode=cope \(CoPE"):
        write_hf(tmp_path, state, both)
    with pytest.raises(ValueError, match="num_feature_levels=2 cannot be written"):
        write_hf(tmp_path, state, load_cfg("coco.yaml", *TINY, "model.num_feature_levels=2").model)
    with pytest.raises(ValueError, match=r"dec_layers=1 cannot be written for transformers \(unless two_stage\)"):
        write_hf(tmp_path, state, load_cfg("coco.yaml", *TINY, "model.dec_layers=1").model)
    with pytest.raises(ValueError, match="num_queries: config 300, weights 12"):
        write_hf(tmp_path, state, load_cfg("coco.yaml", *TINY, "model.num_queries=300").model)
    with pytest.raises(ValueError, match="with_box_refine: config True, weights False"):
        write_hf(tmp_path, state, load_cfg("coco.yaml", *TINY, "model.with_box_refine=true").model)
    with pytest.raises(ValueError, match=r"class ids \[7\] are outside the model's 5 classes"):
        write_hf(tmp_path, state, cfg.model, {7: "x"})
    assert os.listdir(tmp_path) == []
