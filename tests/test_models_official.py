"""The four official COCO variants, built from configs/, have exactly the official state_dict keys and shapes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _models_utils import one_thread  # noqa: F401

from models import build_detector, load_checkpoint, load_config

REFERENCE = "/work/shared/reference/official_state_dict_keys.json"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "single_scale": "coco_single_scale.yaml",
    "multi_scale": "coco.yaml",
    "box_refine": "coco_box_refine.yaml",
    "two_stage": "coco_two_stage.yaml",
}
PARAMS_MILLIONS = {"single_scale": 34, "multi_scale": 40, "box_refine": 41, "two_stage": 41}  # the paper's table

pytestmark = pytest.mark.skipif(not os.path.isfile(REFERENCE), reason=f"{REFERENCE} not available")


@pytest.fixture(scope="module")
def official():
    with open(REFERENCE, encoding="utf-8") as f:
        return json.load(f)


def _build(variant: str):
    cfg = load_config(os.path.join(ROOT, "configs", CONFIGS[variant]), ["model.pretrained_backbone=false"])
    return cfg, build_detector(cfg)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_config_builds_the_official_layout_and_loads_strictly(official, variant):
    reference = official[variant]
    cfg, model = _build(variant)
    for key, value in reference["overrides"].items():
        assert getattr(cfg.model, key) == value
    assert cfg.model.num_classes == reference["num_classes"]
    assert cfg.output_dir == f"runs/{CONFIGS[variant].removesuffix('.yaml')}"

    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference["state_dict"]
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == PARAMS_MILLIONS[variant]

    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator) for k, shape in reference["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    # A real checkpoint holds equal values under the keys of shared heads, as the model's own state_dict does.
    result = load_checkpoint(model, {"model": model.state_dict(), "epoch": 49})
    assert not result.dropped and not result.missing


def test_official_two_stage_runs_on_a_small_image():
    _, model = _build("two_stage")
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 128, 128))  # 16x16 + 8x8 + 4x4 + 2x2 = 340 >= 300 proposals
    assert out["pred_logits"].shape == (1, 300, 91)
    assert out["enc_outputs"]["pred_boxes"].shape == (1, 340, 4)
    assert len(out["aux_outputs"]) == 5
