"""Weights that would silently run otherwise than they were made to: backbones transformers runs differently (both
directions), a checkpoint without box refinement in a box-refinement model, NaN/inf weights, and a DC5 ResNet-18
transformers folder read back."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from _models_utils import TINY, padded_batch, perturb, tiny_config

import models
from models.checkpoint import CheckpointError, read_checkpoint
from models.convert import convert_checkpoint
from models.hf_format import hf_backbone_differences, write_hf
from models.hf_names import backbone_from_hf, hf_to_original, same_values
from models.weights import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")


def outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    images, mask = padded_batch(64, 96)
    with torch.no_grad():
        out = model.eval()(images, mask)
    return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}


def built(*overrides: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build_detector(tiny_config(*overrides))
    perturb(model)
    return model.eval()


# -- backbones transformers runs otherwise (D1, D2) ------------------------------------------------------------------


def test_resnets_and_plain_timm_models_run_alike() -> None:
    pytest.importorskip("timm")
    for backbone in ("resnet18", "resnet50", "timm/resnet18", "timm/resnet10t"):
        assert hf_backbone_differences(backbone) == (), backbone


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ("timm/mobilenetv3_small_050", r"BatchNormAct2d with ReLU after the norm"),
        ("timm/efficientnet_b0", r"BatchNormAct2d with SiLU after the norm"),
        ("timm/tf_efficientnet_b0", r"eps 0\.001 .*transformers' frozen BatchNorm uses 1e-05"),
        ("timm/convnext_atto", r"4 feature stages: transformers takes stages \[2, 3, 4\].*the last three \[1, 2, 3\]"),
        ("timm/dla34", r"6 feature stages: .*the last three \[3, 4, 5\]"),
    ],
)
def test_backbones_transformers_runs_otherwise_are_found(backbone: str, expected: str) -> None:
    pytest.importorskip("timm")
    assert any(re.search(expected, found) for found in hf_backbone_differences(backbone))


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [("timm/mobilenetv3_small_050", "BatchNormAct2d"), ("timm/convnext_atto", "4 feature stages")],
)
def test_write_refuses_a_backbone_transformers_runs_otherwise(backbone: str, expected: str, tmp_path) -> None:
    pytest.importorskip("timm")
    cfg = tiny_config(f"model.backbone={backbone}", "model.num_feature_levels=3")
    model = models.build_detector(cfg)
    with pytest.raises(ValueError, match=f"model.backbone={backbone} cannot be written for transformers.*{expected}"):
        write_hf(tmp_path / "hf", model.state_dict(), cfg.model)
    assert not (tmp_path / "hf").exists()


@pytest.fixture
def resnet_folder(tmp_path):
    cfg = tiny_config()
    write_hf(tmp_path / "hf", models.build_detector(cfg).state_dict(), cfg.model)
    return tmp_path / "hf"


def test_read_refuses_a_folder_whose_backbone_transformers_runs_otherwise(resnet_folder) -> None:
    """What transformers computes for a MobileNetV3 folder (its BatchNormAct2d activations dropped) is no model this
    project builds: refused, not read as another model."""
    pytest.importorskip("timm")
    config = json.loads((resnet_folder / "config.json").read_text())
    (resnet_folder / "config.json").write_text(json.dumps({**config, "backbone": "mobilenetv3_small_050"}))
    with pytest.raises(CheckpointError, match="'mobilenetv3_small_050' runs otherwise in transformers.*BatchNormAct2d"):
        read_checkpoint(resnet_folder)


# -- a DC5 ResNet-18/34 folder read back (D4) ------------------------------------------------------------------------


def test_dilated_basic_block_resnets_map_onto_timm() -> None:
    assert backbone_from_hf({"backbone": "resnet18", "dilation": True}) == "timm/resnet18"
    assert backbone_from_hf({"backbone": "resnet34.a1_in1k", "dilation": True}) == "timm/resnet34"
    assert backbone_from_hf({"backbone": "resnet18", "dilation": False}) == "resnet18"
    assert backbone_from_hf({"backbone": "resnet50", "dilation": True}) == "resnet50"  # torchvision's dilates


def test_dilated_timm_resnet18_round_trip(tmp_path) -> None:
    pytest.importorskip("timm")
    cfg = tiny_config("model.backbone=timm/resnet18", "model.dilation=true")
    model = built("model.backbone=timm/resnet18", "model.dilation=true")
    write_hf(tmp_path / "hf", model.state_dict(), cfg.model)
    checkpoint = read_checkpoint(tmp_path / "hf")
    back, _ = models.load_detector(models.config_from_checkpoint(checkpoint), checkpoint)
    expected, got = outputs(model), outputs(back)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


# -- box refinement (D3) ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("made", "loaded"),
    [
        ([], ["model.with_box_refine=true"]),
        (["model.two_stage=true"], ["model.two_stage=true", "model.with_box_refine=true"]),
    ],
    ids=["single-stage", "two-stage"],
)
def test_weights_without_box_refinement_are_refused_by_a_refining_model(made, loaded, tmp_path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(built(*made).state_dict(), path)
    with pytest.raises(ValueError, match=r"one head shared by every decoder layer.*set model.with_box_refine=false"):
        load_checkpoint(models.build_detector(tiny_config(*loaded)), path, reinit_class_heads=False)
    stated = r"with_box_refine: the config says True, the checkpoint False \(override: model.with_box_refine=false\)"
    with pytest.raises(CheckpointError, match=stated):
        models.load_detector(tiny_config(*loaded), path)


@pytest.mark.parametrize("aliases", [True, False], ids=["decoder-names", "top-level-names-only"])
def test_a_bare_state_dict_states_its_box_refinement(aliases, tmp_path) -> None:
    """A state_dict without a config builds the model it came from (its backbone, a resnet18, read from its blocks):
    box refinement is read from the decoder's box-head names or, without them, from box heads whose values differ
    between layers; one head shared reads as none."""
    model = built("model.with_box_refine=true")
    state = model.state_dict()
    if not aliases:
        state = {k: v for k, v in state.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    torch.save(state, tmp_path / "refining.pth")
    torch.save(built().state_dict(), tmp_path / "plain.pth")
    assert read_checkpoint(tmp_path / "refining.pth").options["with_box_refine"] is True
    assert read_checkpoint(tmp_path / "plain.pth").options["with_box_refine"] is False
    checkpoint = read_checkpoint(tmp_path / "refining.pth")
    loaded, _ = models.load_detector(models.config_from_checkpoint(checkpoint), checkpoint)  # no config given
    assert loaded.with_box_refine
    expected, got = outputs(model), outputs(loaded)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key])


def test_convert_refuses_weights_without_box_refinement_as_a_refining_model(tmp_path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(built().state_dict(), path)
    overrides = [*TINY, "model.with_box_refine=true"]
    with pytest.raises(ValueError, match=r"override: model.with_box_refine=false"):
        convert_checkpoint(path, tmp_path / "hf", to="hf", overrides=overrides)
    assert not (tmp_path / "hf").exists()


def test_refining_weights_under_the_top_level_names_only_still_load() -> None:
    """Per-layer box heads saved without their decoder aliases are a box-refinement model's: loaded, same outputs."""
    model = built("model.with_box_refine=true")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("transformer.decoder.bbox_embed.")}
    fresh = models.build_detector(tiny_config("model.with_box_refine=true"))
    load_checkpoint(fresh, state, reinit_class_heads=False)
    expected, got = outputs(model), outputs(fresh)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


# -- NaN and inf weights (D5) ----------------------------------------------------------------------------------------


def test_same_values_takes_nan_as_nan() -> None:
    assert same_values(torch.tensor([NAN, 1.0]), torch.tensor([NAN, 1.0]))
    assert same_values(torch.tensor([INF]), torch.tensor([INF]))
    assert not same_values(torch.tensor([NAN]), torch.tensor([0.0]))
    assert not same_values(torch.tensor([INF]), torch.tensor([-INF]))
    assert not same_values(torch.tensor([1.0]), torch.tensor([1.0 + 1e-6]))
    assert not same_values(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("key", "value"), [("class_embed.0.bias", NAN), ("transformer.level_embed", INF)], ids=["nan-shared", "inf"]
)
def test_non_finite_weights_are_refused_with_the_key_named(key: str, value: float, tmp_path) -> None:
    state = dict(built().state_dict())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    if key.startswith("class_embed."):  # one tensor under every layer's name, as the model saves it
        for other in [k for k in state if k.startswith("class_embed.") and k.endswith(".bias")]:
            state[other] = state[key]
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"the weight {key} holds 1 NaN/inf value\(s\)") as caught:
        models.load_detector(tiny_config(), path)
    assert "with_box_refine" not in str(caught.value)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.complex64])
def test_quantised_weights_are_refused_with_the_key_named(dtype: torch.dtype, tmp_path) -> None:
    state = dict(built().state_dict())
    state["transformer.level_embed"] = state["transformer.level_embed"].to(dtype)
    path = tmp_path / "quantised.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"the weight transformer.level_embed is {str(dtype)[6:]}, where"):
        models.load_detector(tiny_config(), path)
    state["transformer.level_embed"] = state["transformer.level_embed"].half()  # half precision loads (upcast)
    torch.save(state, path)
    models.load_detector(tiny_config(), path)


def test_nan_under_both_transformers_names_is_one_tensor() -> None:
    weight = torch.tensor([[NAN, 1.0]])
    state = {
        "model.backbone.conv_encoder.model.conv1.weight": weight,
        "model.backbone.model.conv1.weight": weight.clone(),  # transformers 5's in-memory name of the same key
    }
    assert torch.equal(hf_to_original(state, "f")["backbone.0.body.conv1.weight"].isnan(), weight.isnan())


def _wrapped(kind: str, model: torch.nn.Module) -> object:
    state = model.state_dict()
    if kind == "compiled":
        return torch.compile(model).state_dict()  # keys under _orig_mod. (nothing is compiled until called)
    if kind == "averaged":
        return {"model": torch.optim.swa_utils.AveragedModel(model).state_dict()}  # module. + n_averaged
    if kind == "ddp-compiled":
        return {f"module._orig_mod.{k}": v for k, v in state.items()}
    if kind == "lightning":
        return {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    return {kind: state, "epoch": 3}  # model_state_dict, ema


@pytest.mark.parametrize("kind", ["compiled", "averaged", "ddp-compiled", "lightning", "model_state_dict", "ema"])
def test_weights_under_common_wrappers_are_read(kind, tmp_path) -> None:
    """What training code commonly saves: torch.compile's and AveragedModel's key prefixes, a Lightning checkpoint
    (state_dict entry, the detector as self.model), a model_state_dict or ema entry: the detector's own weights."""
    model = built()
    torch.save(_wrapped(kind, model), tmp_path / "w.pth")
    checkpoint = read_checkpoint(tmp_path / "w.pth")
    assert checkpoint.model.keys() == model.state_dict().keys()
    fresh = models.build_detector(tiny_config())
    load_checkpoint(fresh, checkpoint, reinit_class_heads=False)
    expected, got = outputs(model), outputs(fresh)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], expected[key])


def test_other_heads_or_points_are_named_with_the_settings_that_fit() -> None:
    """The attention weights' rows are nheads x levels x points: a checkpoint made with 2 heads names the products and
    settings that fit, and its keys of another shape are not listed again as missing."""
    state = built("model.nheads=2").state_dict()
    with pytest.raises(ValueError) as info:
        load_checkpoint(models.build_detector(tiny_config()), state, reinit_class_heads=False)
    message = str(info.value)
    assert "the checkpoint's encoder attention has nheads x enc_n_points = 8 (this model 32)" in message
    assert "model.nheads=2 model.enc_n_points=4" in message and "model.nheads=2 model.dec_n_points=4" in message
    assert "keys missing from the checkpoint" not in message and "strict=False) loads what fits" in message


def test_a_bare_two_stage_state_dict_says_its_query_count_is_assumed(tmp_path) -> None:
    """Two-stage weights have no query embedding: the query count is the default unless given, and a warning says
    so; an original file's args and an override say it."""
    torch.save(built("model.with_box_refine=true", "model.two_stage=true").state_dict(), tmp_path / "two.pth")
    checkpoint = read_checkpoint(tmp_path / "two.pth")
    with pytest.warns(UserWarning, match=r"two-stage model's weights do not show .* pass model.num_queries=N"):
        assert models.config_from_checkpoint(checkpoint).model.num_queries == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overrides = ["model.num_queries=20", "data.val_size=800", "data.val_max_size=1333"]  # the resize, too
        assert models.config_from_checkpoint(checkpoint, overrides).model.num_queries == 20
