"""tools/experiments/cope_gate_contrast.py: the count density of a CoPE detector on objects against the background.
A fresh CoPE detector counts every pixel 1 (the plain module), which the tool must measure as no contrast; the
pixels said to be inside a box are those whose centres are; a model without CoPE is refused."""

from __future__ import annotations

import pytest
import torch
from _data_utils import write_coco
from _models_utils import tiny_config
from _repo import load_tool

from deformable.data import build_dataset
from models import build_detector
from models.config import DataConfig

contrast = load_tool("experiments/cope_gate_contrast")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_pixels_inside_a_box_are_those_whose_centres_lie_in_it() -> None:
    mask = torch.zeros(1, 40, 80, dtype=torch.bool)
    mask[:, :, 60:] = True  # the image is 60 px wide, padded to 80
    box = torch.tensor([[0.45, 0.25, 0.5, 0.5]])  # x 12..42, y 0..20 of the 60 x 40 image
    inside = contrast.inside_boxes([{"boxes": box}], mask, (4, 8))  # 10 px per level pixel, centres at 5, 15, ...
    expected = torch.zeros(1, 4, 8, dtype=torch.bool)
    expected[0, :2, 1:4] = True  # centres x 15, 25, 35 and y 5, 15
    assert torch.equal(inside, expected)


def test_a_fresh_cope_detector_shows_no_contrast(tmp_path) -> None:
    root = write_coco(str(tmp_path / "data"))
    dataset = build_dataset(DataConfig(root=root, val_size=64, val_max_size=96, num_workers=0), "val")
    model = build_detector(tiny_config("model.enc_offset_mode=cope", "model.dec_offset_mode=cope")).eval()
    results = contrast.measure(model, dataset, images=len(dataset), batch_size=2)
    assert {level for _, level in results} == set(range(model.transformer.level_embed.shape[0]))
    assert any(name.startswith("encoder.") for name, _ in results) and any(n.startswith("decoder.") for n, _ in results)
    for row in (c.summary() for c in results.values()):
        assert row["on_objects"] == pytest.approx(1.0) and row["background"] == pytest.approx(1.0)
        assert row["best_ratio"] == pytest.approx(1.0)
    assert all(c.on_pixels > 0 and c.off_pixels > 0 for c in results.values())


def test_a_model_without_cope_is_refused(tmp_path) -> None:
    root = write_coco(str(tmp_path / "data"))
    dataset = build_dataset(DataConfig(root=root, val_size=64, val_max_size=96, num_workers=0), "val")
    with pytest.raises(ValueError, match="has no CoPE attention"):
        contrast.measure(build_detector(tiny_config()).eval(), dataset, images=1)
