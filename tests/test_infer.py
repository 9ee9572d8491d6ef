"""tools/infer.py end to end, batched inference with padding, class names, and errors naming the file."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from _repo import load_tool
from _viz_utils import shapes_image, tiny_config, tiny_model, tool_argv_config, write_checkpoint, write_image

from deformable.inference import class_names, list_images, load_detector
from deformable.inference.images import ImageError
from deformable.inference.run import run_inference

pytestmark = pytest.mark.usefixtures("one_thread")

infer = load_tool("infer")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("infer")
    folder = root / "images"
    folder.mkdir()
    write_image(str(folder / "a_wide.png"), shapes_image(60, 80))  # the largest: never padded in a batch
    write_image(str(folder / "b_small.jpg"), shapes_image(30, 30, seed=1))
    write_image(str(root / "c_tall.png"), shapes_image(70, 40, seed=2))
    (folder / "notes.txt").write_text("not an image")
    return {
        "root": str(root),
        "folder": str(folder),
        "single": str(root / "c_tall.png"),
        "checkpoint": write_checkpoint(str(root / "checkpoint.pth"), tiny_model(), tiny_config()),
    }


def test_infer_writes_annotated_images_and_coco_results(tmp_path, files, capsys) -> None:
    out = str(tmp_path / "out")
    argv = [*tool_argv_config(tmp_path), files["folder"], files["single"], "--checkpoint", files["checkpoint"]]
    argv += ["--out", out, "--batch-size", "2", "--score-threshold", "0", "--device", "cpu"]
    assert infer.main(argv) == 0, capsys.readouterr().err
    written = ["a_wide.jpg", "b_small.jpg", "c_tall.jpg", "images.json", "results.json"]
    assert sorted(os.listdir(out)) == [".infer-outputs.json", *written]  # the list of what infer may replace
    with open(os.path.join(out, "images.json")) as f:
        images = json.load(f)
    assert [(i["id"], os.path.basename(i["file_name"]), i["height"], i["width"]) for i in images] == [
        (1, "a_wide.png", 60, 80),
        (2, "b_small.jpg", 30, 30),
        (3, "c_tall.png", 70, 40),
    ]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert {r["image_id"] for r in results} == {1, 2, 3}
    for r in results:
        assert set(r) == {"image_id", "category_id", "bbox", "score"} and len(r["bbox"]) == 4
        assert 0 <= r["score"] <= 1 and r["bbox"][2] > 0 and r["bbox"][3] > 0
    assert "detections in 3 images" in capsys.readouterr().out


def test_batching_with_padding_keeps_the_unpadded_image_results(tmp_path, files) -> None:
    """The largest image is not padded in a batch, so its detections equal those of batch size 1."""
    paths = list_images([files["folder"]])
    cfg = tiny_config()
    kwargs = dict(score_threshold=0.0, device=torch.device("cpu"), show_progress=False)
    alone = run_inference(cfg, files["checkpoint"], paths, str(tmp_path / "one"), batch_size=1, **kwargs).results
    batched = run_inference(cfg, files["checkpoint"], paths, str(tmp_path / "two"), batch_size=2, **kwargs).results
    first = [r for r in alone if r["image_id"] == 1]
    first_batched = [r for r in batched if r["image_id"] == 1]
    assert len(first) == len(first_batched) > 0
    for a, b in zip(first, first_batched, strict=True):
        assert a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)


def test_class_names_from_the_checkpoint_config(tmp_path) -> None:
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    payload = {"images": [], "annotations": [], "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    saved = tiny_config(f"data.root={root}")
    model = tiny_model()
    checkpoint = write_checkpoint(str(tmp_path / "c.pth"), model, saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint: no random-weights warning
        _, state = load_detector(tiny_config(), checkpoint, torch.device("cpu"))
    assert class_names(tiny_config(), state) == {1: "cat", 3: "dog"}
    assert class_names(tiny_config(), None) == {}  # no data set found: numeric ids
    assert class_names(tiny_config("data.synthetic=shapes"), None) == {1: "circle", 2: "square", 3: "triangle"}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["missing.png"], "image missing.png does not exist"),
        (["EMPTY"], "holds no image"),
        (["BROKEN"], "cannot read image"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, files, capsys, inputs, message) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    inputs = [{"EMPTY": str(empty), "BROKEN": str(broken)}.get(i, i) for i in inputs]
    argv = [*tool_argv_config(tmp_path), *inputs, "--checkpoint", files["checkpoint"], "--out", str(tmp_path / "o")]
    assert infer.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and os.path.basename(inputs[0]) in err


def test_folders_skip_hidden_files_and_quoted_patterns_are_expanded(tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.jpg", "a.png"):
        write_image(str(folder / name), shapes_image(20, 20))
    (folder / "._b.jpg").write_bytes(b"macOS metadata, not an image")
    assert list_images([str(folder)]) == [str(folder / "a.png"), str(folder / "b.jpg")]
    assert list_images([str(folder / "*.jpg")]) == [str(folder / "b.jpg")]  # what the shell did not expand
    with pytest.raises(ImageError, match=r"pattern .*\*\.gif matches no image"):
        list_images([str(folder / "*.gif")])


def test_a_double_star_pattern_takes_a_tree_and_an_empty_folder_points_to_it(tmp_path) -> None:
    top = tmp_path / "shots"
    for sub in ("day", "night/late", ".cache"):
        (top / sub).mkdir(parents=True)
    for name in ("day/a.jpg", "night/late/b.png", ".cache/c.jpg"):
        write_image(str(top / name), shapes_image(20, 20))
    with pytest.raises(ImageError, match=r"holds no image .*; its subfolders do: pass the pattern '.*\*\*/\*'"):
        list_images([str(top)])
    assert list_images([str(top / "**" / "*")]) == [str(top / "day" / "a.jpg"), str(top / "night" / "late" / "b.png")]
    (top / "day" / "a.jpg").unlink()
    (top / "night" / "late" / "b.png").unlink()
    with pytest.raises(ImageError, match=r"holds no image \([^)]*\)$"):  # the hidden folder's image is not offered
        list_images([str(top)])


def test_bad_checkpoint_and_batch_size(tmp_path, files, capsys) -> None:
    base = [*tool_argv_config(tmp_path), files["single"], "--out", str(tmp_path / "o")]
    assert infer.main([*base, "--checkpoint", str(tmp_path / "none.pth")]) == 1
    assert "none.pth does not exist" in capsys.readouterr().err
    not_a_checkpoint = tmp_path / "weights.pth"
    torch.save({"weights": torch.zeros(1)}, not_a_checkpoint)
    assert infer.main([*base, "--checkpoint", str(not_a_checkpoint)]) == 1
    assert "weights.pth: checkpoint does not fit this model" in (err := capsys.readouterr().err)
    assert "it shares no key with this detector" in err
    with pytest.raises(SystemExit, match="2"):  # an option's value: argparse's status and usage line
        infer.main([*base, "--checkpoint", files["checkpoint"], "--batch-size", "0"])
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ImageError, match="does not exist"):
        list_images([str(tmp_path / "nope")])
