"""Each layout read from a folder the test writes; the same data set out of all four; raccoon read in place."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from _data_utils import CLASSES, SPLITS, WRITERS, voc_xml, write_image, write_voc, write_yolo
from _repo import SHARED, path_from_env

from deformable.data import (
    DatasetError,
    build_dataset,
    dataset_class_names,
    dataset_index,
    detect_layout,
    summarise,
)
from deformable.inference.run import image_ids
from models.config import ConfigError, DataConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT_NAMES = {  # what split names auto picks per layout
    "coco": ("train2017", "val2017"),
    "roboflow": ("train", "valid"),
    "yolo": ("train", "val"),
    "voc": ("train", "val"),
    "roboflow-voc": ("train", "valid"),
}


def _cfg(root: str, **kwargs) -> DataConfig:
    return DataConfig(root=root, val_size=64, val_max_size=100, num_workers=0, **kwargs)


def _content(dataset) -> dict[str, list[tuple[str, list[float]]]]:
    """Image stem -> sorted (class name, [x, y, w, h] rounded to 1e-3 px) of a dataset's COCO dict."""
    names = dataset.class_names()
    content = {}
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        boxes = [(names[a["category_id"]], [round(v, 3) for v in a["bbox"]]) for a in dataset.coco.imgToAnns[image_id]]
        content[os.path.splitext(os.path.basename(info["file_name"]))[0]] = sorted(boxes)
    return content


def _expected(split: str) -> dict[str, list[tuple[str, list[float]]]]:
    return {stem: sorted((n, [float(v) for v in box]) for n, box in boxes) for stem, _, _, boxes in SPLITS[split]}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_every_layout_gives_the_same_images_boxes_and_names(layout: str, tmp_path) -> None:
    root = WRITERS[layout](str(tmp_path / layout))
    assert detect_layout(root) == layout
    for which, name in zip(("train", "val"), SPLIT_NAMES[layout], strict=True):
        dataset = build_dataset(_cfg(root), which, transforms=False)
        assert (dataset.layout, dataset.split) == (layout, name)
        assert dataset.class_names() == {1: "cat", 2: "dog"} and dataset.category_ids() == [1, 2]
        assert _content(dataset) == _expected(which)
        sizes = {os.path.splitext(dataset.coco.imgs[i]["file_name"])[0]: dataset.coco.imgs[i] for i in dataset.ids}
        for stem, width, height, _ in SPLITS[which]:
            assert (sizes[stem]["width"], sizes[stem]["height"]) == (width, height)
        image, target = dataset[0]
        assert tuple(image.shape) == (3, target["orig_size"][0], target["orig_size"][1])


@pytest.mark.parametrize("layout", list(WRITERS))
def test_transformed_samples_are_normalised_cxcywh(layout: str, tmp_path) -> None:
    dataset = build_dataset(_cfg(WRITERS[layout](str(tmp_path / layout))), "val")
    image, target = dataset[1]  # e: 48 x 64 with a dog and a cat
    assert image.dtype == torch.float32 and image.shape == (3, 85, 64)
    assert sorted(target["labels"].tolist()) == [1, 2]
    boxes = {label: box for label, box in zip(target["labels"].tolist(), target["boxes"], strict=True)}
    assert torch.allclose(boxes[2], torch.tensor([14 / 48, 19 / 64, 20 / 48, 30 / 64]), atol=1e-4)


def test_format_can_be_forced_and_an_unknown_one_is_named(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    assert build_dataset(_cfg(root, format="voc"), "val", transforms=False).layout == "voc"
    with pytest.raises(ConfigError, match="'data.format' must be one of auto, coco, roboflow, yolo, voc, roboflow-voc"):
        build_dataset(_cfg(root, format="kitti"), "val")
    with pytest.raises(DatasetError, match=r"instances_val2017.json does not exist"):
        build_dataset(_cfg(root, format="coco"), "val")


def test_split_names_and_annotation_files_are_configurable(tmp_path) -> None:
    root = WRITERS["coco"](str(tmp_path / "c"))
    os.rename(os.path.join(root, "annotations", "instances_val2017.json"), os.path.join(root, "mine.json"))
    os.rename(os.path.join(root, "val2017"), os.path.join(root, "holdout"))
    dataset = build_dataset(_cfg(root, val_split="holdout", val_ann="mine.json"), "val", transforms=False)
    assert dataset.split == "holdout" and dataset.source == os.path.join(root, "mine.json")
    assert _content(dataset) == _expected("val")
    voc = write_voc(str(tmp_path / "v"))
    assert len(build_dataset(_cfg(voc, val_split="train"), "val", transforms=False)) == len(SPLITS["train"])


def test_no_matching_layout_lists_what_each_needs_and_what_is_there(tmp_path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError) as info:
        build_dataset(_cfg(str(tmp_path)), "train")
    message = str(info.value)
    for needs in ("instances_<split>.json", "_annotations.coco.json", "data.yaml", "ImageSets/Main/<split>.txt"):
        assert needs in message
    assert "found at the top of" in message and "notes.txt, photos/" in message
    assert "delete" not in message.lower()


def test_missing_root_says_what_to_put_there(tmp_path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist.*coco, roboflow, yolo, voc.*cocodataset.org"):
        build_dataset(_cfg(str(tmp_path / "nowhere")), "train")


def test_roboflow_drops_only_the_unused_supercategory(tmp_path) -> None:
    root = WRITERS["roboflow"](str(tmp_path / "r"))
    dataset = build_dataset(_cfg(root), "train", transforms=False)
    assert dataset.class_names() == {1: "cat", 2: "dog"}  # id 0 "animals" had no box and is their supercategory


def test_yolo_names_as_mapping_and_roboflow_style_paths(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"), names={0: "cat", 1: "dog"})
    assert build_dataset(_cfg(root), "train", transforms=False).class_names() == {1: "cat", 2: "dog"}
    with open(os.path.join(root, "data.yaml"), "w") as f:  # no path; entries ../ relative like Roboflow writes
        yaml.safe_dump({"train": "../images/train", "val": "../images/val", "nc": 2, "names": CLASSES}, f)
    dataset = build_dataset(_cfg(os.path.join(root, "data.yaml")), "val", transforms=False)
    assert _content(dataset) == _expected("val")


def test_yolo_names_with_quoted_indices(tmp_path) -> None:
    """Ultralytics reads ``names: {"0": cat, "1": dog}``; so does this."""
    root = write_yolo(str(tmp_path / "y"), names={"1": "dog", "0": "cat"})
    assert build_dataset(_cfg(root), "train", transforms=False).class_names() == {1: "cat", 2: "dog"}
    write_yolo(root, names={"0": "cat", "one": "dog"})
    with pytest.raises(DatasetError, match="'names' must be a list of class names or a mapping index -> name"):
        build_dataset(_cfg(root), "train", transforms=False)


@pytest.mark.parametrize("layout", ["coco", "yolo", "voc"])
def test_files_saved_with_a_byte_order_mark_read_as_without(layout: str, tmp_path) -> None:
    """Windows tools (Notepad, some exporters) start UTF-8 text with a BOM; the content is the same."""
    root = WRITERS[layout](str(tmp_path / layout))
    if layout == "coco":
        texts = [os.path.join(root, "annotations", "instances_val2017.json")]
    elif layout == "yolo":
        texts = [os.path.join(root, "data.yaml"), *(os.path.join(root, "labels", "val", f"{s}.txt") for s in "de")]
    else:
        texts = [os.path.join(root, "ImageSets", "Main", "val.txt")]
    for path in texts:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8-sig") as f:
            f.write(text)
    assert _content(build_dataset(_cfg(root), "val", transforms=False)) == _expected("val")


def test_yolo_list_file_and_polygon_lines(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("images/val/e.jpg\n./images/val/d.jpg\n")
    with open(os.path.join(root, "labels", "val", "d.txt"), "w") as f:
        f.write("0 0.1 0.2 0.5 0.2 0.3 0.6\n")  # a triangle: its box is x 0.1-0.5, y 0.2-0.6
    with open(os.path.join(root, "data.yaml"), "w") as f:
        yaml.safe_dump({"train": "images/train", "val": "val.txt", "names": CLASSES}, f)
    dataset = build_dataset(_cfg(root), "val", transforms=False)
    content = _content(dataset)
    assert sorted(content) == ["d", "e"] and content["d"] == [("cat", [6.0, 10.0, 24.0, 20.0])]


def test_voc_difficult_objects_are_crowd_and_classes_are_sorted(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    _, width, height, boxes = SPLITS["val"][1]
    boxes = [("zebra", [1, 1, 5, 5]), *boxes]  # zebra only in val: still a class, sorted last
    with open(os.path.join(root, "Annotations", "e.xml"), "w") as f:
        f.write(voc_xml("e", width, height, boxes, difficult=2))
    for which in ("train", "val"):
        dataset = build_dataset(_cfg(root), which, transforms=False)
        assert dataset.class_names() == {1: "cat", 2: "dog", 3: "zebra"}
    crowd = [a for a in dataset.coco.dataset["annotations"] if a["iscrowd"]]
    assert [(a["category_id"], a["bbox"]) for a in crowd] == [(1, [30.0, 40.0, 10.0, 12.0])]
    _, target = build_dataset(_cfg(root), "val", transforms=False)[1]
    assert sorted(target["labels"].tolist()) == [2, 3]  # training ignores the difficult cat


def test_boxes_outside_the_image_are_clipped_or_dropped_and_counted(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    boxes = [("cat", [-5, 2, 20, 10]), ("dog", [70, 5, 10, 10]), ("dog", [10, 10, 10, 10])]  # image d is 60 wide
    with open(os.path.join(root, "Annotations", "d.xml"), "w") as f:
        f.write(voc_xml("d", 60, 50, boxes))
    dataset = build_dataset(_cfg(root), "val", transforms=False)
    assert (dataset.data.clipped, dataset.data.dropped) == (1, 1)
    assert _content(dataset)["d"] == [("cat", [0.0, 2.0, 15.0, 10.0]), ("dog", [10.0, 10.0, 10.0, 10.0])]
    assert "1 box clipped to its image, 1 box with no area in the image dropped (e.g. image d.jpg, annotation" in (
        summarise(dataset)
    )
    assert "bbox [70, 5, 10, 10] outside the 60x50 image)" in summarise(dataset)


def test_a_box_written_backwards_is_named_and_rounding_is_not_counted_as_clipping(tmp_path) -> None:
    """xmin > xmax (a LabelImg slip) is dropped with the file named; a box 0.001 px outside its image (rounding of
    normalised coordinates) is clipped without being counted."""
    root = write_voc(str(tmp_path / "v"))
    with open(os.path.join(root, "Annotations", "d.xml"), "w") as f:
        f.write(voc_xml("d", 60, 50, [("cat", [10, 2, 20, 10])]).replace("<xmin>11</xmin>", "<xmin>40</xmin>", 1))
    dataset = build_dataset(_cfg(root), "val", transforms=False)
    assert dataset.data.dropped == 1 and "written backwards (a negative width or height" in summarise(dataset)
    from deformable.data.split import clip_boxes

    coco = {
        "images": [{"id": 1, "width": 60, "height": 50}],
        "annotations": [{"image_id": 1, "bbox": [0, 0, 60.001, 9]}],
    }
    assert clip_boxes(coco)[:2] == (0, 0) and coco["annotations"][0]["bbox"][2] == 60.0


def test_yolo_image_without_label_file_has_no_object(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    write_image(os.path.join(root, "images", "val", "f.jpg"), 30, 20, [])
    with open(os.path.join(root, "labels", "val", "e.txt"), "w") as f:
        f.write("\n")  # empty
    content = _content(build_dataset(_cfg(root), "val", transforms=False))
    assert content["f"] == [] and content["e"] == []


@pytest.fixture(scope="module")
def raccoon() -> str:
    default = os.path.join(SHARED, "data", "raccoon")
    return path_from_env("DEFORMABLE_RACCOON", "the raccoon data set's folder (Pascal VOC layout)", "dir", default)


def test_raccoon_reads_in_place(raccoon: str) -> None:
    cfg = _cfg(raccoon)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (train.layout, len(train), len(val)) == ("voc", 160, 40)
    assert train.class_names() == val.class_names() == {1: "raccoon"}
    image, target = val[0]
    assert image.shape[0] == 3 and max(image.shape[-2:]) <= 100 and len(target["labels"]) >= 1
    assert target["labels"].tolist() == [1] * len(target["labels"])
    line = summarise(train, num_queries=300)
    assert line.startswith("train (voc, ") and "160 images" in line and "1 class," in line
    assert "\n" not in line


@pytest.mark.parametrize("layout", list(WRITERS))
def test_class_names_and_image_ids_for_inference(layout: str, tmp_path) -> None:
    root = WRITERS[layout](str(tmp_path / layout))
    assert dataset_class_names(_cfg(root)) == {1: "cat", 2: "dog"}
    ids, names, sizes = dataset_index(_cfg(root))
    assert sizes[1] == (50, 60)  # d.jpg, as annotated
    assert names == {1: "cat", 2: "dog"}
    by_name = {key: image_id for key, image_id in ids.items() if not os.path.isabs(key)}
    by_path = {os.path.basename(key): image_id for key, image_id in ids.items() if os.path.isabs(key)}
    assert by_name == by_path == {"d.jpg": 1, "e.jpg": 2}
    assert all(os.path.isfile(key) for key in ids if os.path.isabs(key))


def test_inference_ids_follow_the_path_where_file_names_repeat(tmp_path, monkeypatch) -> None:
    """COCO file names with folders (a/1.jpg, b/1.jpg): each keeps its own id when inferred on, by path; a unique
    name (d/2.jpg) is also found by name alone (a copy elsewhere), a repeated one is not."""
    split = tmp_path / "val2017"
    files = {10: "a/1.jpg", 20: "b/1.jpg", 40: "d/2.jpg"}
    for name in files.values():
        write_image(str(split / name), 32, 32, [])
    images = [{"id": i, "file_name": name, "width": 32, "height": 32} for i, name in files.items()]
    payload = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    elsewhere = tmp_path / "copies"
    for name in ("1.jpg", "2.jpg"):
        write_image(str(elsewhere / name), 32, 32, [])
    monkeypatch.chdir(tmp_path)  # relative paths, as given on a command line
    paths = ["val2017/b/1.jpg", "val2017/a/1.jpg", "val2017/d/2.jpg", "copies/2.jpg", "copies/1.jpg"]
    index = dataset_index(_cfg(str(tmp_path)))
    assert image_ids(paths, index) == {paths[0]: 20, paths[1]: 10, paths[2]: 40, paths[3]: 41, paths[4]: 42}
    assert image_ids(paths[3:], index) == {paths[3]: 40, paths[4]: 41}


def test_class_names_need_no_images(tmp_path) -> None:
    (tmp_path / "annotations").mkdir()
    categories = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    payload = {"images": [], "annotations": [], "categories": categories}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(payload))
    assert dataset_class_names(_cfg(str(tmp_path))) == {1: "cat", 3: "dog"}
    assert dataset_index(_cfg(str(tmp_path))) == ({}, {}, {})
    assert dataset_class_names(_cfg(str(tmp_path / "none"))) == {}
    shapes = dataset_class_names(_cfg(str(tmp_path / "none"), synthetic="shapes"))
    assert shapes == {1: "circle", 2: "square", 3: "triangle"}
