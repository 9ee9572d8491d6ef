"""``data.image_size``: the short side chosen from the training split's boxes and images, and what follows from it."""

from __future__ import annotations

import pytest
from _repo import config_path

from deformable.data.sizes import SIZE_KEYS, auto_image_size, inference_size, resolve_image_size, sizes_for
from models.config import ConfigError, load_config


def _coco(image_sides: list[tuple[int, int]], box_sides: list[float]) -> dict:
    """One square box of side ``box_sides[i] * image width`` per image, cycling over the images."""
    images = [{"id": i + 1, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, (w, h) in enumerate(image_sides)]
    anns = []
    for n, side in enumerate(box_sides):
        image = images[n % len(images)]
        s = side * (image["width"] * image["height"]) ** 0.5
        anns.append({"id": n + 1, "image_id": image["id"], "bbox": [0, 0, s, s], "category_id": 1})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}


def test_small_boxes_raise_the_size_up_to_the_images_and_the_budget() -> None:
    photos = [(1000, 800)] * 10
    assert auto_image_size(_coco(photos, [0.7] * 20), 256, 640) == 256  # large objects: the floor
    assert auto_image_size(_coco(photos, [0.1] * 20), 256, 640) == 320  # 32 px / 0.1
    assert auto_image_size(_coco(photos, [0.02] * 20), 256, 640) == 640  # tiny objects: the budget
    small = [(300, 200)] * 10
    assert auto_image_size(_coco(small, [0.02] * 20), 128, 640) == 192  # never above the median short side
    assert auto_image_size(_coco(photos, []), 256, 640) == 256


def test_the_tenth_percentile_box_decides() -> None:
    sides = [0.5] * 90 + [0.08] * 10 + [0.05] * 5  # 105 boxes: the 10% quantile is 0.08
    assert auto_image_size(_coco([(1000, 1000)] * 5, sides), 128, 1000) == 416  # 32 / 0.08 = 400 -> 416


def test_sizes_follow_the_originals_relations() -> None:
    assert sizes_for(800) == {
        "train_scales": [608, 640, 672, 704, 736, 768, 800],
        "train_max_size": 1333,
        "crop_scales": [384, 512, 608],
        "crop_size": [384, 608],
        "val_size": 800,
        "val_max_size": 1333,
    }
    assert sizes_for(256)["train_scales"] == [192, 224, 256] and sizes_for(256)["val_max_size"] == 427
    assert set(sizes_for(256)) == set(SIZE_KEYS)  # the keys a size set beside data.image_size is checked against


def test_resolve_image_size_from_the_config() -> None:
    cfg = load_config(None, ["data.image_size=auto", "data.min_image_size=128", "data.max_image_size=512"])
    resolved, why = resolve_image_size(cfg, _coco([(640, 480)] * 4, [0.1] * 8))
    assert resolved.data.val_size == 320 and resolved.data.image_size == 0 and cfg.data.image_size == "auto"
    assert why.startswith("data.image_size=auto -> 320 px (small boxes are 0.10 of the image side")
    fixed, why = resolve_image_size(load_config(None, ["data.image_size=300"]))
    assert fixed.data.val_size == 288 and why == "data.image_size=300 -> short side 288 px"
    unchanged, why = resolve_image_size(load_config(None, []))
    assert unchanged.data.val_size == 800 and why == ""
    with pytest.raises(ConfigError, match="'data.image_size' must be 0, 'auto' or a short side >= 32, got 'big'"):
        resolve_image_size(load_config(None, ["data.image_size=big"]))


def test_the_chosen_size_stays_within_the_limits_after_rounding() -> None:
    tiny = _coco([(1000, 800)] * 10, [0.01] * 20)  # wants 3200 px
    assert auto_image_size(tiny, 256, 500) == 480  # 512 is the nearest multiple of 32, above the budget
    assert auto_image_size(tiny, 256, 310) == 288
    large = _coco([(1000, 800)] * 10, [0.9] * 20)  # wants 36 px
    assert auto_image_size(large, 270, 640) == 288  # 256 would be below the minimum
    with pytest.raises(ConfigError, match=r"'data.min_image_size' \(600\) and 'data.max_image_size' \(300\) leave no"):
        auto_image_size(large, 600, 300)
    with pytest.raises(ConfigError, match=r"\(270\) and 'data.max_image_size' \(280\) leave no multiple of 32"):
        auto_image_size(large, 270, 280)


@pytest.mark.parametrize("value", ["auto", "320"])
def test_sizes_set_beside_a_derived_image_size_are_refused(value: str) -> None:
    coco = _coco([(640, 480)] * 4, [0.1] * 8)
    for override in ("data.train_scales=[320]", "data.crop_size=[100,200]", "data.val_size=320"):
        cfg = load_config(None, [f"data.image_size={value}", override])
        with pytest.raises(ConfigError) as info:
            resolve_image_size(cfg, coco)
        key = override.split("=")[0]
        assert f"would replace {key}=" in str(info.value) and "set data.image_size=0" in str(info.value)


def test_inference_resizes_as_training_did(tmp_path) -> None:
    """A config file with data.image_size (custom.yaml's auto) given to eval/infer/Predictor with a checkpoint: the
    resize is the one its training chose (its saved config), N's sizes for N, the configured ones for 0; sizes the
    command line sets win; auto without the checkpoint's sizes or the data says so and keeps the configured ones."""
    from models.checkpoint import Checkpoint
    from models.config import config_to_dict

    config = config_path("custom.yaml")  # data.image_size: auto
    trained, _ = resolve_image_size(load_config(config, ["data.image_size=320"]))
    checkpoint = Checkpoint(path="ck.pth", format="project", model={}, config=config_to_dict(trained))

    def sizes(overrides: list[str], given: Checkpoint | None = checkpoint, path: str = config) -> tuple:
        cfg = inference_size(load_config(path, overrides), given, overrides)
        return cfg.data.image_size, cfg.data.val_size, cfg.data.val_max_size

    assert sizes([]) == (0, 320, trained.data.val_max_size)
    assert sizes(["data.image_size=256"])[1] == 256
    assert sizes(["data.val_size=300"])[1] == 300
    with pytest.warns(UserWarning, match="data.image_size=auto cannot be resolved without the training split"):
        assert sizes([f"data.root={tmp_path}"], None)[1] == 800
    assert sizes([], path=config_path("shapes.yaml"))[1] == 112  # image_size 0: as set
