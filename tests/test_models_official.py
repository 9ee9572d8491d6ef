"""The four official COCO variants, built from configs/, have exactly the official state_dict keys and shapes (the
list is read from ``DEFORMABLE_OFFICIAL_KEYS``, see conftest.py; those tests are skipped without it)."""

from __future__ import annotations

import pytest
import torch
from _repo import config_path

from models import build_detector, load_checkpoint, load_config

CONFIGS = {
    "single_scale": "coco_single_scale.yaml",
    "multi_scale": "coco.yaml",
    "box_refine": "coco_box_refine.yaml",
    "two_stage": "coco_two_stage.yaml",
}
PARAMS_MILLIONS = {"single_scale": 34, "multi_scale": 40, "box_refine": 41, "two_stage": 41}  # the paper's table

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(variant: str):
    cfg = load_config(config_path(CONFIGS[variant]), ["model.pretrained_backbone=false"])
    return cfg, build_detector(cfg)


@pytest.mark.parametrize("variant", list(CONFIGS))
def test_config_builds_the_official_layout_and_loads_strictly(official_keys, variant):
    reference = official_keys[variant]
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
