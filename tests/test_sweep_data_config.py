"""Refusals before anything is written (the synthetic data set included), values refused when the config is read,
COCO annotation files named by option under layout detection, image sizes that disagree with the file stating them
(named, also from a DataLoader worker), tools/make_shapes.py's arguments, the layouts the config documents."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
from _data_utils import SPLITS, voc_xml, write_coco, write_roboflow_voc, write_voc
from _repo import config_path, load_tool
from tiny_training import SHAPES_CONFIG, tiny_overrides
from torch.utils.data import DataLoader, Dataset

from deformable.data import LAYOUTS, MARKER, DatasetError, build_dataset, error_message, make_shapes
from deformable.training import build as training_build
from models.config import DATA_FORMATS, ConfigError, DataConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

train_tool = load_tool("train")
eval_tool = load_tool("eval")
shapes_tool = load_tool("make_shapes")

TINY_SHAPES = dict(train_images=8, val_images=4, image_size=64, max_objects=2)  # what tiny_overrides asks for


def _tiny_shapes(root: Path) -> str:
    make_shapes(str(root), **TINY_SHAPES)
    return str(root)


def _snapshot(root: str) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime in ns) of every file under ``root``."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found


# 1. A refused run writes nothing: the synthetic data set is not regenerated first.


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ([], "checkpoint.pth exists: output_dir holds an earlier run"),  # a new run over the finished one
        (["train.resume=auto", "train.epochs=2", "train.lr=0.01"], "train.lr: the checkpoint was trained with"),
        (["train.resume=auto", "train.epochs=2", "model.hidden_dim=64"], "hidden_dim: the config says 64"),
        (["data.image_size=64"], "data.image_size=64 derives the training and evaluation sizes"),
        (["model.two_stage=true", "training_queries.query_groups=2"], "query_groups=2 needs learned queries"),
    ],
)
def test_a_refused_run_leaves_the_synthetic_data_set_as_it_was(finished, tmp_path, capsys, extra, error) -> None:
    """The overrides ask for another synthetic set than the one generated (9 training images, not 8): a run that
    went ahead would regenerate it; a refused one must not touch it."""
    data = _tiny_shapes(tmp_path / "shapes")
    before = _snapshot(data)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    overrides = tiny_overrides(data, str(run), "data.synthetic_train_images=9", *extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "regenerating ..." would be a UserWarning
        assert train_tool.main([SHAPES_CONFIG, *overrides]) == 1
    assert error in capsys.readouterr().err
    assert _snapshot(data) == before


def test_a_refused_run_creates_no_output_dir(tmp_path, capsys) -> None:
    data = _tiny_shapes(tmp_path / "shapes")
    before = _snapshot(data)
    run = tmp_path / "run"
    overrides = tiny_overrides(data, str(run), "data.synthetic_train_images=9", "train.finetune=missing.pth")
    assert train_tool.main([SHAPES_CONFIG, *overrides]) == 1
    assert "train.finetune=missing.pth" in capsys.readouterr().err
    assert not run.exists() and _snapshot(data) == before


def test_a_value_refused_when_the_config_is_read_leaves_the_data_alone(tmp_path, capsys) -> None:
    data = _tiny_shapes(tmp_path / "shapes")
    before = _snapshot(data)
    overrides = tiny_overrides(data, str(tmp_path / "run"), "data.synthetic_train_images=9", "data.format=bogus")
    assert train_tool.main([SHAPES_CONFIG, *overrides]) == 1
    assert "'data.format' must be one of auto, coco" in capsys.readouterr().err
    assert _snapshot(data) == before and not (tmp_path / "run").exists()


# 4. Out-of-range values are refused when the config is read, naming the key, the rule and the value.


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.format=bogus",
            "'data.format' must be one of auto, coco, roboflow, yolo, voc, roboflow-voc, got 'bogus'",
        ),
        ("data.image_size=abc", "'data.image_size' must be 0, 'auto' or a short side >= 32, got 'abc'"),
        ("data.image_size=16", "'data.image_size' must be 0, 'auto' or a short side >= 32, got 16"),
        ("data.image_size=-32", "'data.image_size' must be 0, 'auto' or a short side >= 32, got -32"),
        ("data.synthetic=circles", "'data.synthetic' must be '' (none) or 'shapes', got 'circles'"),
        ("data.synthetic_train_images=0", "'data.synthetic_train_images' must be >= 1, got 0"),
        ("data.synthetic_image_size=4", "'data.synthetic_image_size' must be >= 8, got 4"),
        ("training_queries.dn_groups=-1", "'training_queries.dn_groups' must be >= 0, got -1"),
        ("training_queries.query_groups=0", "'training_queries.query_groups' must be >= 1, got 0"),
        ("training_queries.dn_label_noise=3", "'training_queries.dn_label_noise' must be in [0, 1], got 3.0"),
        ("training_queries.dn_box_noise=-1", "'training_queries.dn_box_noise' must be in [0, 1], got -1.0"),
    ],
)
def test_out_of_range_values_are_refused_when_read(override, message) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SHAPES_CONFIG, [override])
    assert message in str(info.value)


def test_values_in_range_are_accepted() -> None:
    cfg = load_config(
        SHAPES_CONFIG, ["data.image_size=auto", "data.format=roboflow-voc", "training_queries.dn_groups=0"]
    )
    assert (cfg.data.image_size, cfg.data.format, cfg.training_queries.dn_groups) == ("auto", "roboflow-voc", 0)
    assert load_config(SHAPES_CONFIG, ["data.image_size=32", "training_queries.dn_box_noise=1"]).data.image_size == 32
    assert load_config(None, ["data.image_size=0", "data.synthetic=''"]).data.synthetic == ""


def test_the_formats_a_config_accepts_are_the_layouts_read() -> None:
    assert set(DATA_FORMATS) == {"auto", *LAYOUTS}


# 2. data.train_ann / data.val_ann with data.format auto.


def test_coco_annotation_files_named_by_option_are_read_without_data_format(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    (tmp_path / "c" / "ann").mkdir()
    os.rename(os.path.join(root, "annotations", "instances_train2017.json"), os.path.join(root, "ann", "tr.json"))
    os.rename(os.path.join(root, "annotations", "instances_val2017.json"), os.path.join(root, "ann", "va.json"))
    os.rmdir(os.path.join(root, "annotations"))
    with pytest.raises(DatasetError, match="matches none of the layouts"):
        build_dataset(DataConfig(root=root), "val", transforms=False)
    val_ann = os.path.join(root, "ann", "va.json")  # absolute: as it is
    cfg = DataConfig(root=root, train_ann="ann/tr.json", val_ann=val_ann)
    train, val = build_dataset(cfg, "train", transforms=False), build_dataset(cfg, "val", transforms=False)
    assert (train.layout, train.source, len(train)) == ("coco", os.path.join(root, "ann/tr.json"), len(SPLITS["train"]))
    assert (val.layout, val.source, len(val)) == ("coco", val_ann, len(SPLITS["val"]))


# 3. An image of another size than its annotations state: the file that states it is named.


def _wrong_voc_size(folder: str, stem: str) -> str:
    """Rewrites ``folder/<stem>.xml`` with twice the image's width; returns the XML's path."""
    _, width, height, boxes = next(s for s in SPLITS["train"] + SPLITS["val"] if s[0] == stem)
    path = os.path.join(folder, f"{stem}.xml")
    with open(path, "w") as f:
        f.write(voc_xml(stem, 2 * width, height, boxes))
    return path


@pytest.mark.parametrize(
    ("writer", "folders"),
    [(write_voc, ("Annotations", "JPEGImages")), (write_roboflow_voc, ("valid", "valid"))],
)
def test_a_voc_size_mismatch_names_the_xml_and_the_image(tmp_path, writer, folders) -> None:
    root = writer(str(tmp_path / "v"))
    xml = _wrong_voc_size(os.path.join(root, folders[0]), "d")
    dataset = build_dataset(DataConfig(root=root), "val", transforms=False)
    with pytest.raises(DatasetError) as info:
        dataset[0]
    message = str(info.value)
    assert f"{xml} (<size>) gives 120x50" in message and os.path.join(root, folders[1], "d.jpg") in message
    assert "ImageSets" not in message and "is 60x50" in message
    dataset[1]  # the other image is as its XML says


class _Failing(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        try:
            raise OSError("disk gone")
        except OSError as exc:
            raise DatasetError("image x.jpg is 3x2 but\nx.xml gives 4x2") from exc


def test_error_message_of_a_worker_error_is_the_workers_own() -> None:
    with pytest.raises(DatasetError) as info:
        next(iter(DataLoader(_Failing(), num_workers=1)))
    assert "Caught DatasetError in DataLoader worker process" in str(info.value)  # what torch makes of it
    assert error_message(info.value) == "image x.jpg is 3x2 but\nx.xml gives 4x2"
    assert error_message(DatasetError("plain")) == "plain" and error_message(ValueError("a: b")) == "a: b"


def _error(stderr: str) -> str:
    """What a tool printed from its error line on (the progress bars come before it on stderr)."""
    assert "error: " in stderr, stderr
    return stderr[stderr.index("error: ") :]


def test_train_and_eval_print_a_worker_error_without_its_traceback(finished, tmp_path, capsys, monkeypatch) -> None:
    """data.num_workers=1: the image is read in a worker process, whose error torch wraps in a traceback. The check
    of every image before training (tests/test_data_image_scan.py) would find these first: it is turned off, as for
    a file that changes after it (and the generated demo set, evaluated below, is not checked)."""
    monkeypatch.setattr(training_build, "find_bad_images", lambda *args, **kwargs: None)
    root = write_voc(str(tmp_path / "v"))
    xml = [_wrong_voc_size(os.path.join(root, "Annotations"), stem) for stem, *_ in SPLITS["train"]]
    overrides = tiny_overrides(root, str(tmp_path / "run"), "data.synthetic=''", "data.num_workers=1")
    assert train_tool.main([SHAPES_CONFIG, *overrides]) == 1
    err = _error(capsys.readouterr().err)
    assert re.match(r"error: image \S+ \(image id \d\) is \d+x\d+ \(width x height", err)
    assert any(f"but {path} (<size>) gives" in err for path in xml)
    assert "Traceback" not in err and "Caught" not in err and "worker" not in err

    data = _tiny_shapes(tmp_path / "shapes")
    ann = os.path.join(data, "annotations", "instances_val2017.json")
    with open(ann) as f:
        payload = json.load(f)
    for image in payload["images"]:
        image["width"] += 1
    with open(ann, "w") as f:
        json.dump(payload, f)
    checkpoint = os.path.join(finished, "checkpoint.pth")
    args = ["--checkpoint", checkpoint, f"data.root={data}", "data.num_workers=1", f"output_dir={tmp_path / 'e'}"]
    assert eval_tool.main(args) == 1
    err = _error(capsys.readouterr().err)
    assert err.startswith("error: image ") and f"but {ann} gives" in err and "Traceback" not in err


# 5. tools/make_shapes.py: the config is optional, overrides alone are overrides.


def test_make_shapes_takes_overrides_without_a_config(tmp_path, capsys) -> None:
    root = tmp_path / "s"
    sizes = ["data.synthetic_train_images=2", "data.synthetic_val_images=1", "data.synthetic_image_size=48"]
    assert shapes_tool.main([f"data.root={root}", *sizes]) == 0
    assert json.loads((root / MARKER).read_text())["train_images"] == 2
    assert shapes_tool.main([f"data.root={root}", "--force", *sizes[1:], "data.synthetic_train_images=3"]) == 0
    assert json.loads((root / MARKER).read_text())["train_images"] == 3
    assert shapes_tool.main([config_path("shapes.yaml"), f"data.root={tmp_path / 't'}", *sizes]) == 0
    assert shapes_tool.main(["data.root", str(root)]) == 1
    assert "override 'data.root' must look like section.key=value" in capsys.readouterr().err


# 6. The layouts the configs document.


def test_custom_config_names_every_layout() -> None:
    with open(config_path("custom.yaml")) as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert all(layout in header for layout in LAYOUTS)
