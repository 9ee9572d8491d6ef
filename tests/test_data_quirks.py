"""Quirks of data sets as people bring them: NaN boxes, text that is not UTF-8, macOS metadata files, Roboflow's
category and split conventions, ``~`` in paths, image extensions in capitals, class names that differ in case. Each
is read or refused naming the file, from the readers alone (no training)."""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata

import pytest
import yaml
from _data_utils import replace_in_file, write_coco, write_roboflow, write_roboflow_voc, write_voc, write_yolo

from deformable.data import DatasetError, build_dataset, read_class_names, read_split, validation_without_boxes
from deformable.data.sizes import resolve_image_size
from models.config import Config, DataConfig, load_config


def _read(root: str, split: str = "train", **kwargs):
    return read_split(DataConfig(root=root, **kwargs), split)


def _edit_json(path: str, edit) -> None:
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    edit(payload)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)  # Python's json writes NaN and Infinity as such


def _write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


# --- 1. NaN / inf in boxes and sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_coco_box_that_is_not_finite_is_refused_naming_the_annotation(tmp_path, value: float) -> None:
    root = write_coco(str(tmp_path / "c"))
    ann_file = os.path.join(root, "annotations", "instances_train2017.json")
    _edit_json(ann_file, lambda p: p["annotations"][1]["bbox"].__setitem__(0, value))
    message = re.escape(f"annotation file {ann_file}: annotation id 2 (image id 1) has a 'bbox' value that is not a")
    with pytest.raises(DatasetError, match=message):
        _read(root)
    # data.image_size=auto reads the training boxes: the same error, not a ValueError from the size arithmetic
    with pytest.raises(DatasetError, match=message):
        resolve_image_size(Config(data=DataConfig(root=root, image_size="auto")))


@pytest.mark.parametrize("key,value", [("width", float("nan")), ("height", float("inf")), ("width", 0), ("height", -5)])
def test_coco_image_size_that_is_not_positive_and_finite_is_refused(tmp_path, key: str, value: float) -> None:
    root = write_coco(str(tmp_path / "c"))
    ann_file = os.path.join(root, "annotations", "instances_val2017.json")
    _edit_json(ann_file, lambda p: p["images"][1].__setitem__(key, value))
    with pytest.raises(DatasetError, match=re.escape(f"{ann_file}: image id 2 (e.jpg) has {key} ") + ".* a number > 0"):
        _read(root, "val")


def test_coco_float_image_size_is_still_read_from_the_image(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    _edit_json(os.path.join(root, "annotations", "instances_val2017.json"), lambda p: p["images"][0].update(width=60.0))
    assert _read(root, "val").coco["images"][0]["width"] == 60


@pytest.mark.parametrize("text", ["NaN", "nan", "inf", "-Infinity"])
def test_voc_coordinate_that_is_not_finite_is_refused_naming_the_object(tmp_path, text: str) -> None:
    root = write_voc(str(tmp_path / "v"))
    path = os.path.join(root, "Annotations", "a.xml")
    replace_in_file(path, "<xmin>31</xmin>", f"<xmin>{text}</xmin>")  # a.xml: object 1 cat, object 2 dog (xmin 31)
    message = re.escape(f"{path}: <xmin> must be a finite number, got '{text}' (object 2 'dog')")
    with pytest.raises(DatasetError, match=message):
        _read(root)
    with pytest.raises(DatasetError, match=message):
        resolve_image_size(Config(data=DataConfig(root=root, image_size="auto")))


def test_voc_size_that_is_not_finite_is_refused(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    path = os.path.join(root, "Annotations", "b.xml")
    replace_in_file(path, "<width>50</width>", "<width>NaN</width>")
    with pytest.raises(DatasetError, match=re.escape(f"{path}: <width> must be a finite number, got 'NaN' (<size>)")):
        _read(root)


# --- 2. text that is not UTF-8 --------------------------------------------------------------------------------------


def _latin1_message(path: str, position: int, line: int) -> str:
    return (
        re.escape(f"{path} is not UTF-8 text: byte 0xe9 at position {position} (line {line})") + r".*save the file as"
    )


def test_data_yaml_that_is_not_utf8_is_refused_naming_the_byte(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    path = _write(os.path.join(root, "data.yaml"), b"train: images/train\nval: images/val\nnames: [caf\xe9, dog]\n")
    with pytest.raises(DatasetError, match=_latin1_message(path, 47, 3)):
        _read(root)
    with pytest.raises(DatasetError, match=_latin1_message(path, 47, 3)):
        read_class_names(DataConfig(root=root))


def test_yolo_label_and_list_files_that_are_not_utf8_are_refused(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    label = _write(os.path.join(root, "labels", "val", "d.txt"), b"0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2 # chat\xe9\n")
    with pytest.raises(DatasetError, match=_latin1_message(label, 42, 2)):
        _read(root, "val")
    os.remove(label)
    listing = _write(os.path.join(root, "val.txt"), b"\xef\xbb\xbfimages/val/d.jpg\nimages/val/\xe9.jpg\n")
    with open(os.path.join(root, "data.yaml"), "w") as f:
        yaml.safe_dump({"train": "images/train", "val": "val.txt", "names": ["cat", "dog"]}, f)
    with pytest.raises(DatasetError, match=_latin1_message(listing, 31, 2)):  # the position counts the BOM's 3 bytes
        _read(root, "val")


def test_coco_and_voc_lists_that_are_not_utf8_say_so_alike(tmp_path) -> None:
    coco = write_coco(str(tmp_path / "c"))
    ann_file = _write(os.path.join(coco, "annotations", "instances_val2017.json"), b'{"info": "caf\xe9"}')
    with pytest.raises(DatasetError, match=_latin1_message(ann_file, 13, 1)):
        _read(coco, "val")
    voc = write_voc(str(tmp_path / "v"))
    listing = _write(os.path.join(voc, "ImageSets", "Main", "val.txt"), b"d\n\xe9\n")
    with pytest.raises(DatasetError, match=_latin1_message(listing, 2, 2)):
        _read(voc, "val")


# --- 3. macOS metadata files ----------------------------------------------------------------------------------------


def _macos_junk(folder: str) -> None:
    """What copying or zipping on a Mac leaves: AppleDouble ``._name`` files, and ``__MACOSX/`` in a zip."""
    _write(os.path.join(folder, "._d.jpg"), b"\x00\x05\x16\x07AppleDouble")
    _write(os.path.join(folder, "__MACOSX", "._e.jpg"), b"\x00\x05\x16\x07AppleDouble")
    _write(os.path.join(folder, "__MACOSX", "e.jpg"), b"\x00\x05\x16\x07AppleDouble")
    _write(os.path.join(folder, ".thumbnails", "d.jpg"), b"not an image")


def test_yolo_folder_listing_leaves_out_macos_metadata(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    _macos_junk(os.path.join(root, "images", "val"))
    data = _read(root, "val")
    assert [info["file_name"] for info in data.coco["images"]] == ["d.jpg", "e.jpg"]


def test_roboflow_voc_folder_leaves_out_macos_metadata(tmp_path) -> None:
    root = write_roboflow_voc(str(tmp_path / "r"))
    _macos_junk(os.path.join(root, "valid"))
    _write(os.path.join(root, "valid", "._d.xml"), b"\x00\x05\x16\x07AppleDouble")
    data = _read(root, "val")
    assert [info["file_name"] for info in data.coco["images"]] == ["d.jpg", "e.jpg"]
    assert data.notes == []  # "._d.jpg" is no image without an XML


# --- 4. data.yaml without val ---------------------------------------------------------------------------------------


def test_data_yaml_without_val_lists_only_its_own_keys(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    with open(os.path.join(root, "data.yaml"), "w") as f:
        f.write("train: images/train\nnames: [cat, dog]\n")
    with pytest.raises(DatasetError, match=r"data.yaml has no 'val' entry \(it has: train, names\)$"):
        _read(root, "val")


# --- 5. Roboflow export with only train/ ----------------------------------------------------------------------------


def test_roboflow_without_valid_names_the_split_folders_tried_and_found(tmp_path) -> None:
    root = write_roboflow(str(tmp_path / "r"))
    shutil.rmtree(os.path.join(root, "valid"))
    with pytest.raises(DatasetError) as caught:
        _read(root, "val")
    message = str(caught.value)
    assert os.path.join(root, "valid", "_annotations.coco.json") + " does not exist" in message
    assert "tried the split folder(s) valid, val, test" in message and "found: train" in message
    assert "set data.val_split" in message and "cocodataset.org" not in message
    assert len(_read(root, "val", val_split="train").coco["images"]) == 3


# --- 6. data.train_ann without data.val_ann -------------------------------------------------------------------------


def test_train_ann_without_val_ann_suggests_val_ann(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    annotations = os.path.join(root, "annotations")
    os.rename(os.path.join(annotations, "instances_train2017.json"), os.path.join(annotations, "mine_train.json"))
    os.rename(os.path.join(annotations, "instances_val2017.json"), os.path.join(annotations, "mine_val.json"))
    cfg = DataConfig(root=root, train_ann="annotations/mine_train.json")
    assert len(read_split(cfg, "train").coco["images"]) == 3
    with pytest.raises(DatasetError) as caught:
        read_split(cfg, "val")
    message = str(caught.value)
    assert "data.train_ann is set but data.val_ann is not: set data.val_ann=PATH" in message
    assert "mine_train.json, mine_val.json" in message and "cocodataset.org" not in message
    both = DataConfig(root=root, train_ann=cfg.train_ann, val_ann="annotations/mine_val.json")
    assert len(read_split(both, "val").coco["images"]) == 2
    # Images elsewhere than <root>/<split>/ (a Label Studio export: <root>/images/): the split folder is named.
    os.rename(os.path.join(root, "val2017"), os.path.join(root, "images"))
    with pytest.raises(DatasetError) as caught:
        read_split(both, "val")
    message = str(caught.value)
    assert "set data.val_split to the folder under data.root that they are relative to" in message
    assert "cocodataset.org" not in message
    moved = DataConfig(root=root, train_ann=cfg.train_ann, val_ann=both.val_ann, val_split="images")
    assert len(read_split(moved, "val").coco["images"]) == 2


# --- 7. ~ in data.root ----------------------------------------------------------------------------------------------


def test_tilde_in_data_root_and_annotation_files_is_expanded(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_yolo(str(tmp_path / "y"))
    assert len(_read("~/y", "val").coco["images"]) == 2
    assert read_class_names(DataConfig(root="~/y")) == {1: "cat", 2: "dog"}
    root = write_coco(str(tmp_path / "c"))
    ann = "~/c/annotations/instances_val2017.json"
    assert _read(root, "val", train_ann=ann, val_ann=ann).source == os.path.join(root, "annotations", ann[16:])
    with pytest.raises(DatasetError, match=re.escape(f"data.root {tmp_path / 'missing'} does not exist")):
        _read("~/missing")
    # every path key, however the config is made: a run writes into ~/run, not into a folder named "~"
    cfg = load_config(None, ["output_dir=~/run", "train.finetune=~/w.pth", "train.resume=~/r.pth", "data.root=~/y"])
    assert (cfg.output_dir, cfg.train.finetune, cfg.train.resume, cfg.data.root) == tuple(
        str(tmp_path / name) for name in ("run", "w.pth", "r.pth", "y")
    )
    assert load_config(None, ["train.resume=auto"]).train.resume == "auto"


# --- 8. data.yaml path: that does not exist -------------------------------------------------------------------------


def test_data_yaml_path_that_does_not_exist_is_named_as_the_base(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    with open(os.path.join(root, "data.yaml"), "w") as f:
        f.write("path: ../datasets/y\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n")
    base = os.path.join(str(tmp_path), "datasets", "y")
    message = re.escape(f"'path: ../datasets/y' is used as the base directory of the splits, and that folder ({base})")
    with pytest.raises(DatasetError, match=message + " does not exist"):
        _read(root, "val")


# --- 9. Roboflow-VOC image extension in capitals --------------------------------------------------------------------


def test_roboflow_voc_finds_the_image_by_stem_whatever_the_extension_case(tmp_path) -> None:
    root = write_roboflow_voc(str(tmp_path / "r"))
    folder = os.path.join(root, "valid")
    os.rename(os.path.join(folder, "d.jpg"), os.path.join(folder, "PHOTO.JPG"))
    with open(os.path.join(folder, "d.xml")) as f:
        xml = f.read()
    os.remove(os.path.join(folder, "d.xml"))
    with open(os.path.join(folder, "PHOTO.xml"), "w") as f:
        f.write(xml.replace("<filename>d.jpg</filename>", "<filename>photo.jpg</filename>"))
    data = _read(root, "val")
    assert [info["file_name"] for info in data.coco["images"]] == ["PHOTO.JPG", "e.jpg"] and data.notes == []


def test_voc_ids_and_filenames_in_another_unicode_normalisation_read_the_files_on_disk(tmp_path) -> None:
    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    # the original layout: the list file says NFC, the files on disk are NFD (as macOS zips write names)
    root = write_voc(str(tmp_path / "v"))
    for folder, ext in (("Annotations", ".xml"), ("JPEGImages", ".jpg")):
        os.rename(os.path.join(root, folder, "d" + ext), os.path.join(root, folder, nfd + ext))
    replace_in_file(os.path.join(root, "ImageSets", "Main", "val.txt"), "d\n", nfc + "\n")
    data = _read(root, "val")
    assert [info["file_name"] for info in data.coco["images"]] == [nfd + ".jpg", "e.jpg"]
    assert len(data.coco["annotations"]) == len(_read(write_voc(str(tmp_path / "w")), "val").coco["annotations"])
    # Roboflow's layout: the XML's <filename> says NFC, the image beside it is NFD and has another stem
    root = write_roboflow_voc(str(tmp_path / "r"))
    os.rename(os.path.join(root, "valid", "d.jpg"), os.path.join(root, "valid", nfd + ".jpg"))
    replace_in_file(
        os.path.join(root, "valid", "d.xml"), "<filename>d.jpg</filename>", f"<filename>{nfc}.jpg</filename>"
    )
    assert [info["file_name"] for info in _read(root, "val").coco["images"]] == [nfd + ".jpg", "e.jpg"]


# --- 10. VOC class names that differ only in case -------------------------------------------------------------------


def test_voc_class_names_differing_in_case_stay_apart_with_a_warning(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    path = os.path.join(root, "Annotations", "e.xml")
    replace_in_file(path, "<name>dog</name>", "<name>Dog</name>")  # e.xml (val): dog, cat
    data = _read(root)
    assert [cat["name"] for cat in data.coco["categories"]] == ["Dog", "cat", "dog"]
    first_dog = os.path.join(root, "Annotations", "a.xml")
    assert data.notes == [
        f"warning: the class names 'Dog' (e.g. {path}) and 'dog' (e.g. {first_dog}) differ only in case and are read "
        "as separate classes; rename them alike if they are one class"
    ]


# --- 11. Roboflow project named as its only class -------------------------------------------------------------------


def _roboflow_one_class(root: str) -> str:
    """Roboflow's export of a project "dog" with the one class "dog": entry 0 (the project) names no parent, entry 1
    (the class) names itself as its supercategory."""
    write_roboflow(root)
    categories = [{"id": 0, "name": "dog", "supercategory": "none"}, {"id": 1, "name": "dog", "supercategory": "dog"}]
    for split in ("train", "valid"):

        def one_class(payload: dict) -> None:
            payload["categories"] = categories
            for ann in payload["annotations"]:
                ann["category_id"] = 1

        _edit_json(os.path.join(root, split, "_annotations.coco.json"), one_class)
    return root


def test_roboflow_project_named_as_its_only_class_is_one_class(tmp_path) -> None:
    root = _roboflow_one_class(str(tmp_path / "r"))
    for split in ("train", "val"):
        assert _read(root, split).coco["categories"] == [{"id": 1, "name": "dog", "supercategory": "dog"}]
    assert read_class_names(DataConfig(root=root)) == {1: "dog"}


@pytest.mark.parametrize("one_class", [False, True])
def test_roboflow_entry_with_boxes_in_another_split_is_kept_in_every_split(tmp_path, one_class: bool) -> None:
    """Entry 0 is dropped only when no split file read annotates it: else the splits would disagree on the classes."""
    root = _roboflow_one_class(str(tmp_path / "r")) if one_class else write_roboflow(str(tmp_path / "r"))
    _edit_json(
        os.path.join(root, "train", "_annotations.coco.json"), lambda p: p["annotations"][0].update(category_id=0)
    )
    expected = [0, 1] if one_class else [0, 1, 2]
    for split in ("train", "val"):
        assert [cat["id"] for cat in _read(root, split).coco["categories"]] == expected
    assert list(read_class_names(DataConfig(root=root))) == expected


# --- more of the sweep: a validation split without boxes, .jfif images --------------------------------------------


def test_a_validation_split_without_boxes_is_warned_about(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    path = os.path.join(root, "annotations", "instances_val2017.json")
    with open(path) as f:
        payload = json.load(f)
    with open(path, "w") as f:
        json.dump({**payload, "annotations": []}, f)
    cfg = DataConfig(root=root, num_workers=0)
    (warning,) = validation_without_boxes(build_dataset(cfg, "val", transforms=False))
    assert f"the validation split 'val2017' ({path}) has no box" in warning and "data.val_split" in warning
    assert validation_without_boxes(build_dataset(cfg, "train", transforms=False)) == []


def test_jfif_images_are_read(tmp_path) -> None:
    root = write_yolo(str(tmp_path / "y"))
    for folder in ("images", "labels"):
        for dirpath, _, names in os.walk(os.path.join(root, folder)):
            for name in names:
                if name.endswith(".jpg"):
                    os.rename(os.path.join(dirpath, name), os.path.join(dirpath, name[:-4] + ".jfif"))
    assert len(_read(root, "val").coco["images"]) == 2


# --- the image formats Ultralytics lists that Pillow reads: .mpo, .avif, .jp2 ---------------------------------------


@pytest.mark.parametrize(
    ("extension", "save_as", "feature"),
    [(".mpo", "MPO", None), (".avif", "AVIF", "avif"), (".jp2", "JPEG2000", "jpg_2000")],
)
def test_mpo_avif_and_jp2_images_are_listed_and_read(
    tmp_path, extension: str, save_as: str, feature: str | None
) -> None:
    """A YOLO set (sizes from the files) and an inference folder with these images take every one, at its size."""
    from PIL import Image, features

    from deformable.inference import list_images

    if feature is not None and not features.check(feature):
        pytest.skip(f"this Pillow cannot write {save_as}")
    root = write_yolo(str(tmp_path / "y"))
    sizes = {}
    for dirpath, _, names in os.walk(os.path.join(root, "images")):
        for name in names:
            stem = name[:-4] + extension.upper()  # the extension in capitals: listings match any case
            with Image.open(os.path.join(dirpath, name)) as picture:
                picture.convert("RGB").save(os.path.join(dirpath, stem), format=save_as)
                sizes[stem] = (picture.height, picture.width)
            os.remove(os.path.join(dirpath, name))
    for split in ("train", "val"):
        dataset = build_dataset(DataConfig(root=root, train_split=split, num_workers=0), "train", transforms=False)
        assert len(dataset) == sum(1 for n in os.listdir(os.path.join(root, "images", split)))
        for image_id in dataset.ids:
            info = dataset.coco.imgs[image_id]
            assert sizes[os.path.basename(info["file_name"])] == (info["height"], info["width"])
            assert tuple(dataset.load_image(image_id).shape[-2:]) == (info["height"], info["width"])
    listed = list_images([os.path.join(root, "images", "val")])
    assert sorted(os.path.basename(p) for p in listed) == sorted(os.listdir(os.path.join(root, "images", "val")))


# --- label files whose image is in a format not read (.gif) are named, not left out unnoticed ---------------------


def test_yolo_label_files_without_a_read_image_are_named(tmp_path) -> None:
    from PIL import Image

    root = write_yolo(str(tmp_path / "y"))
    folder = os.path.join(root, "images", "train")
    converted = sorted(os.listdir(folder))[:2]
    for name in converted:
        with Image.open(os.path.join(folder, name)) as picture:
            picture.save(os.path.join(folder, name[:-4] + ".gif"))
        os.remove(os.path.join(folder, name))
    open(os.path.join(root, "labels", "train", "classes.txt"), "w").write("cat\ndog\n")  # LabelImg's, no labels
    labelled = [n for n in converted if os.path.isfile(os.path.join(root, "labels", "train", n[:-4] + ".txt"))]
    assert labelled, "the test needs a converted image that has labels"
    notes = " ".join(_read(root, "train").notes)
    assert f"{len(labelled)} label file(s) with no image, their boxes not read" in notes
    assert "as .gif (" in notes and "a format not read: convert them" in notes and "classes.txt" not in notes
    assert not any("label file(s) with no image" in note for note in _read(root, "val").notes)

    for name in os.listdir(folder):  # every image of the split in a format not read: an error that says why
        if not name.endswith(".gif"):
            with Image.open(os.path.join(folder, name)) as picture:
                picture.save(os.path.join(folder, name[:-4] + ".gif"))
            os.remove(os.path.join(folder, name))
    with pytest.raises(
        DatasetError, match=r"the yolo split 'train' has no images: .*label file\(s\) with no image.*\.gif"
    ):
        _read(root, "train")


# --- VOC list lines: an id with a space in it is read whole where its XML exists ----------------------------------


def test_voc_ids_with_a_space_are_read_whole_where_their_xml_exists(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    listed = os.path.join(root, "ImageSets", "Main", "train.txt")
    first = open(listed).read().split()[0]
    for folder, extension in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        os.rename(os.path.join(root, folder, first + extension), os.path.join(root, folder, f"{first} 1{extension}"))
    replace_in_file(listed, f"{first}\n", f"{first} 1\n")
    names = [info["file_name"] for info in _read(root, "train").coco["images"]]
    assert f"{first} 1.jpg" in names and f"{first}.jpg" not in names
    replace_in_file(listed, f"{first} 1\n", f"{first} -1\n")  # a class list's flag: the id is the first field
    with pytest.raises(DatasetError, match=rf"line 1: {first} has no annotation file"):
        _read(root, "train")


def test_yolo_split_paths_of_another_machine_point_to_the_folder_beside_data_yaml(tmp_path) -> None:
    """A data.yaml written on Colab (train: /content/datasets/x/train/images) names the folder that is there."""
    root = write_yolo(str(tmp_path / "y"))
    path = os.path.join(root, "data.yaml")
    with open(path) as f:
        payload = yaml.safe_load(f)
    payload.update(train="/content/datasets/x-1/images/train")
    payload.pop("path")
    with open(path, "w") as f:
        yaml.safe_dump(payload, f)
    message = (
        r"'train' points to /content/datasets/x-1/images/train, which does not exist "
        r"\(a path from another machine\?\); "
        rf"{re.escape(os.path.join(root, 'images', 'train'))} exists: write it relative to data.yaml, "
        r"e.g. 'images/train'"
    )
    with pytest.raises(DatasetError, match=message):
        _read(root, "train")
