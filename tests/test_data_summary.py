"""The summary printed before training, its num_queries warning, and model.num_classes: auto."""

from __future__ import annotations

import pytest
from _data_utils import write_coco, write_roboflow, write_voc, write_yolo
from _repo import config_path

from deformable.data import build_dataset, max_objects, resolve_num_classes, summarise
from models.config import Config, ConfigError, DataConfig, ModelConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_line_counts_and_sizes(tmp_path) -> None:
    dataset = build_dataset(DataConfig(root=write_yolo(str(tmp_path / "y"))), "train", transforms=False)
    line = summarise(dataset, num_queries=300)
    assert line.startswith(f"train (yolo, {tmp_path / 'y' / 'data.yaml'} (train: ")
    for part in (
        "3 images",
        "3 boxes",
        "2 classes",
        "at most 2 objects per image",
        "image width 40-64 px, height 40-70 px",
        "box side / image side: median 0.",
    ):
        assert part in line
    assert "\n" not in line and "warning" not in line


def test_summary_warns_when_an_image_has_more_objects_than_queries(tmp_path) -> None:
    dataset = build_dataset(DataConfig(root=write_voc(str(tmp_path / "v"))), "val", transforms=False)
    assert max_objects(dataset) == 2
    line, warning = summarise(dataset, num_queries=1).split("\n")
    assert line.startswith("val (voc, ")
    assert warning == (
        "warning: an image of the val split has 2 objects but model.num_queries is 1, so the detector cannot find "
        "them all; raise it, e.g. model.num_queries=10"
    )
    assert "\n" not in summarise(dataset, num_queries=2)


@pytest.mark.parametrize("writer", [write_coco, write_roboflow, write_yolo, write_voc])
def test_num_classes_auto_is_the_largest_category_id_plus_one(writer, tmp_path) -> None:
    root = writer(str(tmp_path / "d"))
    cfg = Config(model=ModelConfig(num_classes="auto"), data=DataConfig(root=root))
    resolved = resolve_num_classes(cfg)
    assert resolved.model.num_classes == 3 and cfg.model.num_classes == "auto"
    train_set = build_dataset(cfg.data, "train", transforms=False)
    assert resolve_num_classes(cfg, train_set).model.num_classes == 3
    fixed = Config(model=ModelConfig(num_classes=91), data=DataConfig(root=root))
    assert resolve_num_classes(fixed) is fixed


def test_num_classes_accepts_an_integer_or_auto_only() -> None:
    assert load_config(None, ["model.num_classes=auto"]).model.num_classes == "auto"
    assert load_config(None, ["model.num_classes=5"]).model.num_classes == 5
    for bad in ("model.num_classes=many", "model.num_classes=0", "model.num_classes=true"):
        with pytest.raises(ConfigError, match="config key 'model.num_classes'"):
            load_config(None, [bad])
    assert load_config(config_path("coco.yaml")).model.num_classes == 91
    assert load_config(None).data.train_split == "auto" and load_config(None).data.format == "auto"
