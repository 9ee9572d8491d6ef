"""tools/experiments/make_ordinal.py (a generated set whose class is a mark's ordinal position in its row): it reads
as COCO through the project's reader, every row is labelled 1st, 2nd, 3rd, later... from the left, the boxes lie
inside the images, the output is deterministic per seed and a used folder is refused."""

from __future__ import annotations

import json
import os
from itertools import pairwise

from _repo import load_tool

from deformable.data import build_dataset
from deformable.data.layouts import read_split
from models.config import DataConfig

make_ordinal = load_tool("experiments/make_ordinal")


def _rows(annotations: list[dict]) -> list[list[dict]]:
    """One image's annotations grouped into rows: marks whose vertical extents overlap (the rows' bands do not)."""
    rows: list[list[dict]] = []
    for a in sorted(annotations, key=lambda a: a["bbox"][1]):
        if rows and a["bbox"][1] < max(b["bbox"][1] + b["bbox"][3] for b in rows[-1]):
            rows[-1].append(a)
        else:
            rows.append([a])
    return rows


def test_ordinal_reads_as_coco_and_labels_each_row_by_position_from_the_left(tmp_path) -> None:
    root = str(tmp_path / "ordinal")
    assert make_ordinal.main([root, "--train", "12", "--val", "4", "--seed", "3", "--size", "128"]) == 0
    for which, count in (("train", 12), ("val", 4)):
        split = read_split(DataConfig(root=root), which)
        coco = split.coco
        assert split.layout == "coco" and len(coco["images"]) == count
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
        assert [c["name"] for c in coco["categories"]] == ["1st", "2nd", "3rd", "later"]
        assert split.clipped == split.dropped == 0
        by_image = {image["id"]: [] for image in coco["images"]}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
            assert 10 <= w == h <= 18 and a["area"] == w * h  # a mark fills its size x size square
            by_image[a["image_id"]].append(a)
        for image in coco["images"]:
            assert (image["width"], image["height"]) == (128, 128)
            rows = _rows(by_image[image["id"]])
            assert 1 <= len(rows) <= 2
            for row in rows:
                row.sort(key=lambda a: a["bbox"][0])
                assert 3 <= len(row) <= 5
                assert [a["category_id"] for a in row] == [1, 2, 3, 4, 4][: len(row)]
                assert len({(a["bbox"][2], a["bbox"][3]) for a in row}) == 1  # identical marks
                for left, right in pairwise(row):
                    gap = right["bbox"][0] - (left["bbox"][0] + left["bbox"][2])
                    assert 4 <= gap <= 40
    dataset = build_dataset(DataConfig(root=root), "val", transforms=False)
    image, target = dataset[0]
    assert tuple(image.shape) == (3, 128, 128)
    assert len(target["labels"]) == len(dataset.coco.imgToAnns[dataset.ids[0]])


def test_ordinal_is_deterministic_per_seed_and_refuses_a_used_folder(tmp_path, capsys) -> None:
    def files(root: str) -> dict[str, bytes]:
        found = {}
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = f.read()
        return found

    a, b, c = (str(tmp_path / name) for name in "abc")
    for root, seed in ((a, "7"), (b, "7"), (c, "8")):
        assert make_ordinal.main([root, "--train", "3", "--val", "2", "--seed", seed, "--size", "112"]) == 0
    assert files(a) == files(b)
    assert files(a).keys() == files(c).keys()
    assert files(a)["train2017/000001.jpg"] != files(c)["train2017/000001.jpg"]
    with open(f"{a}/annotations/instances_train2017.json", encoding="utf-8") as f_a:
        with open(f"{c}/annotations/instances_train2017.json", encoding="utf-8") as f_c:
            assert json.load(f_a)["annotations"] != json.load(f_c)["annotations"]
    capsys.readouterr()
    assert make_ordinal.main([a, "--train", "3", "--val", "1"]) == 1
    assert f"{a} exists and is not empty" in capsys.readouterr().err
    assert make_ordinal.main([str(tmp_path / "d"), "--size", "64"]) == 1
    assert not os.path.exists(tmp_path / "d")


def _row_gaps(root: str, which: str) -> set[int]:
    """Every gap between neighbouring marks of a row in one split."""
    coco = read_split(DataConfig(root=root), which).coco
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    gaps = set()
    for marks in by_image.values():
        for row in _rows(marks):
            row.sort(key=lambda a: a["bbox"][0])
            gaps |= {right["bbox"][0] - (left["bbox"][0] + left["bbox"][2]) for left, right in pairwise(row)}
    return gaps


def test_val_gaps_draw_the_validation_rows_wider_and_leave_the_training_split_alone(tmp_path) -> None:
    near, wide = str(tmp_path / "near"), str(tmp_path / "wide")
    common = ["--train", "6", "--val", "6", "--seed", "2", "--size", "160", "--gaps", "4", "6"]
    assert make_ordinal.main([near, *common]) == 0
    assert make_ordinal.main([wide, *common, "--val-gaps", "16", "18"]) == 0
    assert _row_gaps(near, "train") <= {4, 5, 6} and _row_gaps(near, "val") <= {4, 5, 6}
    assert _row_gaps(wide, "val") <= {16, 17, 18} and _row_gaps(wide, "val")
    for name in ("annotations/instances_train2017.json", "train2017/000001.jpg"):  # the same training split
        with open(os.path.join(near, name), "rb") as a, open(os.path.join(wide, name), "rb") as b:
            assert a.read() == b.read()


def test_gap_ranges_that_cannot_work_are_clear_errors(tmp_path, capsys) -> None:
    root = str(tmp_path / "o")
    assert make_ordinal.main([root, "--gaps", "6", "4"]) == 1
    assert "--gaps must be 1 <= MIN <= MAX, got 6 4" in capsys.readouterr().err
    assert make_ordinal.main([root, "--val-gaps", "0", "3"]) == 1
    assert "--val-gaps must be 1 <= MIN <= MAX" in capsys.readouterr().err
    assert make_ordinal.main([root, "--val-gaps", "30", "40"]) == 1  # 5 marks of 18 px and 4 gaps of 30 px: 214 px
    assert "--size must be at least 214 (the widest row at gaps of 30 px)" in capsys.readouterr().err
    assert make_ordinal.main([root, "--val-gaps", "30", "40", "--val", "0", "--train", "1"]) == 0  # no val split
    assert not os.path.exists(os.path.join(root, "val2017")) or not os.listdir(os.path.join(root, "val2017"))
