"""tools/experiments/make_clutter.py (the second generated data set of the convergence ablation) and
tools/experiments/convergence_ablation.py (its runner): the data reads as COCO, is deterministic and refuses a used
folder; the runner parses its data sets, resumes without re-running what is done, and tabulates every seed."""

from __future__ import annotations

import json

import pytest
from _repo import config_path, load_tool

from deformable.data.layouts import read_split
from models.config import DataConfig, load_config

make_clutter = load_tool("experiments/make_clutter")
ablation = load_tool("experiments/convergence_ablation")


def test_clutter_reads_as_coco_with_eight_classes_and_boxes_inside_the_images(tmp_path) -> None:
    root = str(tmp_path / "clutter")
    assert make_clutter.main([root, "--train", "6", "--val", "3", "--seed", "4"]) == 0
    for which, count in (("train", 6), ("val", 3)):
        split = read_split(DataConfig(root=root), which)
        coco = split.coco
        assert split.layout == "coco" and len(coco["images"]) == count
        assert [c["name"] for c in coco["categories"]] == make_clutter.CLASSES
        assert split.clipped == split.dropped == 0
        sizes = {image["id"]: (image["width"], image["height"]) for image in coco["images"]}
        per_image = {image_id: 0 for image_id in sizes}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height
            assert 1 <= a["category_id"] <= 8
            per_image[a["image_id"]] += 1
        assert all(1 <= n <= 6 for n in per_image.values())


def test_clutter_is_deterministic_per_seed_and_refuses_a_used_folder(tmp_path, capsys) -> None:
    def annotations(root: str) -> list:
        with open(f"{root}/annotations/instances_train2017.json", encoding="utf-8") as f:
            return json.load(f)["annotations"]

    a, b, c = (str(tmp_path / name) for name in "abc")
    assert make_clutter.main([a, "--train", "3", "--val", "1", "--seed", "7"]) == 0
    assert make_clutter.main([b, "--train", "3", "--val", "1", "--seed", "7"]) == 0
    assert make_clutter.main([c, "--train", "3", "--val", "1", "--seed", "8"]) == 0
    assert annotations(a) == annotations(b) != annotations(c)
    assert make_clutter.main([a, "--train", "3", "--val", "1"]) == 1
    assert f"{a} exists and is not empty" in capsys.readouterr().err


def test_clutter_classes_and_sizes_options(tmp_path, capsys) -> None:
    root = str(tmp_path / "clutter5")
    assert make_clutter.main([root, "--train", "8", "--val", "1", "--classes", "5", "--sizes", "24", "96"]) == 0
    coco = read_split(DataConfig(root=root), "train").coco
    assert [c["name"] for c in coco["categories"]] == make_clutter.CLASSES[:5]
    assert {a["category_id"] for a in coco["annotations"]} <= set(range(1, 6))
    # the glyph is drawn about MIN-MAX px tall; its tight box can be a little shorter (the font's ascent)
    assert min(a["bbox"][3] for a in coco["annotations"]) >= 24 * 0.6
    for bad in (["--classes", "0"], ["--classes", "9"], ["--sizes", "50", "20"], ["--sizes", "2", "20"]):
        with pytest.raises(SystemExit):
            make_clutter.main([str(tmp_path / "bad"), *bad])
    assert "--classes must be between 1 and 8" in capsys.readouterr().err


def test_ablation_data_specs() -> None:
    assert ablation.parse_data("demo=configs/shapes.yaml:3") == ("demo", "configs/shapes.yaml", 3, None)
    assert ablation.parse_data("r=configs/custom.yaml:6:/data/r:x") == ("r", "configs/custom.yaml", 6, "/data/r:x")
    for bad in ("demo", "demo=configs/shapes.yaml", "demo=configs/shapes.yaml:three", "=c.yaml:3"):
        with pytest.raises(ValueError, match="expected NAME=CONFIG:EPOCHS"):
            ablation.parse_data(bad)


def test_ablation_resumes_without_rerunning_and_tables_every_seed(tmp_path, capsys, monkeypatch) -> None:
    done = [
        {
            "data": "demo",
            "option": option,
            "seed": seed,
            "epochs": 3,
            "AP": 0.1 * seed,
            "AP50": 0.2 * seed,
            "minutes": 4.0,
        }  # fmt: skip
        for option in ("none", "all")
        for seed in (1, 2)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    monkeypatch.setattr(ablation, "run_one", lambda *args: pytest.fail(f"re-ran {args}"))
    argv = ["--out", str(tmp_path), "--data", "demo=configs/shapes.yaml:3", "--options", "none", "all"]
    assert ablation.main([*argv, "--seeds", "1", "2"]) == 0
    table = capsys.readouterr().out
    assert "| demo | none | 3 | 0.100 / 0.200 | 0.200 / 0.400 | 0.150 | 0.300 | 4.0 / 4.0 |" in table
    assert table.index("| demo | none |") < table.index("| demo | all |")
    assert ablation.main([*argv[:2], "--data", "demo"]) == 2


def test_training_option_rows_set_every_option_whatever_the_config_ships() -> None:
    keys = {"training_queries.dn_groups", "training_queries.query_groups", "loss.iou_aware"}
    for option in [*ablation.DEFAULT_OPTIONS, "denoising_groups"]:
        assert {override.split("=")[0] for override in ablation.OPTIONS[option]} == keys, option
    shipped = load_config(config_path("custom.yaml"))
    assert shipped.training_queries.dn_groups > 0  # the recipe has denoising on: "none" must turn it off
    none = load_config(config_path("custom.yaml"), ablation.OPTIONS["none"])
    assert (none.training_queries.dn_groups, none.training_queries.query_groups, none.loss.iou_aware) == (0, 1, False)
    recipe = load_config(config_path("custom.yaml"), ablation.OPTIONS["recipe"])
    assert recipe == shipped
