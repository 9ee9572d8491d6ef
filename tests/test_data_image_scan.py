"""Every image checked before training (deformable.data.scan): unreadable, truncated and mis-sized files are named
in one message before anything is written, by the loader's own rules (what it reads passes, what it refuses is
refused, with the same message)."""

from __future__ import annotations

import io
import json
import os
import re
import struct
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from _data_utils import SPLITS, replace_in_file, write_coco, write_rotated_jpeg, write_voc, write_yolo
from _repo import load_tool
from PIL import Image
from tiny_training import SHAPES_CONFIG, tiny_overrides

from deformable.data import DatasetError, build_dataset, find_bad_images, make_shapes
from deformable.data.decode import checked_size, image_size, read_rgb
from deformable.training import build as training_build
from deformable.training.distributed import DistEnv
from models.config import DataConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

train_tool = load_tool("train")
ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _datasets(root: str) -> list:
    return [build_dataset(DataConfig(root=root), split, transforms=False) for split in ("train", "val")]


def _refusal(root: str) -> str:
    message = find_bad_images(_datasets(root), show_progress=False)
    assert message is not None
    return message


def _jpeg(width: int = 64, height: int = 48, **save) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)  # no tiny, all-grey file
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format=save.pop("format", "JPEG"), **save)
    return out.getvalue()


def _edit_coco(root: str, split: str, edit) -> str:
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, encoding="utf-8") as f:
        payload = json.load(f)
    edit(payload)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    return path


def _replace_image(root: str, name: str, data: bytes) -> str:
    """COCO train image ``a`` (64x48) replaced by ``data`` under the file name ``name``; returns its path."""
    _edit_coco(root, "train2017", lambda p: p["images"][0].update(file_name=name))
    os.remove(os.path.join(root, "train2017", "a.jpg"))
    path = os.path.join(root, "train2017", name)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("writer", [write_coco, write_voc, write_yolo])
def test_a_data_set_whose_images_all_read_passes(tmp_path, writer) -> None:
    assert find_bad_images(_datasets(writer(str(tmp_path / "d"))), show_progress=False) is None


WHOLE, PNG = _jpeg(), _jpeg(format="PNG")
FILES = {  # name -> (content, refused): what the loader (PIL) reads is read; what it refuses is refused
    "half.jpg": (WHOLE[: len(WHOLE) // 2], True),  # a copy cut short
    "no-end-marker.jpg": (WHOLE[:-2], True),  # PIL refuses a JPEG without FF D9
    "padded.jpg": (WHOLE + b"\0" * 100 + b"\r\n", False),  # padding some cameras write after the end marker
    "long-padding.jpg": (WHOLE + b"\0" * 10000, False),  # beyond the tail read: decoded to tell
    "trailing-bytes.jpg": (WHOLE + b"thumbnail?", False),  # bytes after FF D9: PIL reads the picture
    "empty.jpg": (b"", True),
    "text.jpg": (b"not an image\n", True),
    "whole.png": (PNG, False),
    "half.png": (PNG[: len(PNG) // 2], True),
    "no-iend.png": (PNG[:-12], False),  # PIL reads a PNG whose pixels are all there
    "whole.webp": (_jpeg(format="WEBP"), False),
    "half.bmp": (_jpeg(format="BMP")[:2000], True),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_the_check_refuses_what_the_loader_refuses_with_its_message(tmp_path, name) -> None:
    content, refused = FILES[name]
    root = write_coco(str(tmp_path / "c"))
    path = _replace_image(root, name, content)
    dataset = build_dataset(DataConfig(root=root), "train", transforms=False)
    problem = dataset.image_problem(1)
    assert (problem is not None) == refused
    if refused:
        with pytest.raises(DatasetError) as error:
            dataset.load_image(1)
        assert str(error.value) == problem and path in problem
    else:
        assert tuple(dataset.load_image(1).shape[1:]) == (48, 64) == checked_size(path)


def test_reasons_for_an_empty_file_a_text_file_and_a_truncated_one(tmp_path) -> None:
    for name, reason in [
        ("empty.jpg", "the file is empty (0 bytes)"),
        ("text.jpg", "not an image file PIL can identify"),
        ("half.jpg", "image file is truncated"),
    ]:
        (tmp_path / name).write_bytes(FILES[name][0])
        with pytest.raises(DatasetError, match=re.escape(f"cannot read image {tmp_path / name}: {reason}")):
            checked_size(str(tmp_path / name))
        with pytest.raises(DatasetError, match=re.escape(f"cannot read image {tmp_path / name}: {reason}")):
            read_rgb(str(tmp_path / name))


def test_several_bad_files_are_named_in_one_message(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    half, empty = os.path.join(root, "train2017", "a.jpg"), os.path.join(root, "train2017", "b.jpg")
    text = os.path.join(root, "val2017", "d.jpg")
    with open(half, "rb") as f:
        data = f.read()
    with open(half, "wb") as f:
        f.write(data[: len(data) // 2])
    open(empty, "wb").close()
    with open(text, "w") as f:
        f.write("not an image")
    val_ann = _edit_coco(root, "val2017", lambda p: p["images"][1].update(width=100))  # e.jpg is 48 wide
    message = _refusal(root)
    assert message.startswith("4 of the 5 images of train2017 (") and " and val2017 (" in message
    assert f"cannot read image {half} (image id 1): image file is truncated" in message
    assert f"cannot read image {empty} (image id 2): the file is empty (0 bytes)" in message
    assert f"cannot read image {text} (image id 1): not an image file PIL can identify" in message
    e = os.path.join(root, "val2017", "e.jpg")
    assert (
        f"image {e} (image id 2) is 48x64 (width x height, EXIF orientation applied) but {val_ann} gives 100x64"
        in message
    )
    assert "remove these images from the data set" in message and "... and" not in message


def test_beyond_ten_bad_files_the_others_are_counted(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))

    def add_empty_images(payload: dict) -> None:
        for image_id in range(4, 16):
            open(os.path.join(root, "train2017", f"x{image_id}.jpg"), "wb").close()
            payload["images"].append({"id": image_id, "file_name": f"x{image_id}.jpg", "width": 8, "height": 8})

    _edit_coco(root, "train2017", add_empty_images)
    message = _refusal(root)
    assert message.startswith("12 of the 17 images") and message.count("the file is empty") == 10
    assert "\n  ... and 2 more\n" in message


@pytest.mark.parametrize("layout", ["yolo", "voc", "coco"])
def test_sizes_read_from_headers_name_every_unreadable_image_at_once(tmp_path, layout) -> None:
    """YOLO (and VOC without <size>, COCO without width/height) reads sizes from the images themselves."""
    root = {"yolo": write_yolo, "voc": write_voc, "coco": write_coco}[layout](str(tmp_path / "d"))
    folder = {"yolo": "images/train", "voc": "JPEGImages", "coco": "train2017"}[layout]
    if layout == "voc":
        for stem in ("a", "b", "c"):
            xml = os.path.join(root, "Annotations", f"{stem}.xml")
            replace_in_file(xml, "<size>", "<size_unused>")
            replace_in_file(xml, "</size>", "</size_unused>")
    if layout == "coco":
        _edit_coco(root, "train2017", lambda p: [info.pop("width") for info in p["images"]])
    empty, text = os.path.join(root, folder, "a.jpg"), os.path.join(root, folder, "c.jpg")
    open(empty, "wb").close()
    with open(text, "w") as f:
        f.write("not an image")
    with pytest.raises(DatasetError) as error:
        build_dataset(DataConfig(root=root), "train")
    message = str(error.value)
    assert re.match(r"2 of the 3 images of \S+.* cannot be read:\n", message)
    assert f"\n  cannot read image {empty}: the file is empty (0 bytes)\n" in message
    assert f"\n  cannot read image {text}: not an image file PIL can identify\n" in message
    assert message.endswith("remove these images from the data set (with their annotations), or fix them: re-save them")


def test_a_voc_size_mismatch_names_the_xml(tmp_path) -> None:
    root = write_voc(str(tmp_path / "v"))
    xml = os.path.join(root, "Annotations", "d.xml")
    replace_in_file(xml, "<width>60</width>", "<width>61</width>")
    message = _refusal(root)
    assert message.startswith("1 of the 5 images")
    assert f"{os.path.join(root, 'JPEGImages', 'd.jpg')} (image id 1) is 60x50" in message
    assert f"but {xml} (<size>) gives 61x50: the boxes were drawn on another version" in message


@pytest.mark.parametrize("suffix", ["jpg", "png"])
@pytest.mark.parametrize("layout", ["coco", "voc"])
def test_a_turned_photo_passes_with_its_displayed_size_and_is_refused_with_its_stored_one(tmp_path, layout, suffix):
    """Phone photos: stored sideways with an EXIF orientation. An annotation giving the upright size (as labelling
    tools show it) is right; one giving the stored size is refused, the message saying why."""
    root = (write_coco if layout == "coco" else write_voc)(str(tmp_path / "d"))
    folder = os.path.join(root, "val2017" if layout == "coco" else "JPEGImages")
    stem, width, height, _ = SPLITS["val"][0]  # d: 60x50
    path = os.path.join(folder, f"{stem}.jpg")
    upright = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    write_rotated_jpeg(path, upright)
    if suffix == "png":  # the same, as a PNG with an eXIf chunk (the name keeps .jpg: PIL reads the content)
        with Image.open(path) as stored:
            stored.save(path, format="PNG", exif=stored.getexif())
    assert image_size(path) == checked_size(path) == (height, width) == read_rgb(path).shape[:2]
    assert find_bad_images(_datasets(root), show_progress=False) is None
    if layout == "coco":
        stated_by = _edit_coco(root, "val2017", lambda p: p["images"][0].update(width=height, height=width))
    else:
        stated_by = os.path.join(root, "Annotations", f"{stem}.xml")
        replace_in_file(stated_by, "<width>60</width><height>50</height>", "<width>50</width><height>60</height>")
    message = _refusal(root)
    assert f"{path} (image id 1) is 60x50 (width x height, EXIF orientation applied) but {stated_by}" in message
    assert "gives 50x60: that is its size as stored, which its EXIF orientation (6) turns a quarter" in message


def test_a_png_whose_exif_follows_its_pixels_is_read_upright(tmp_path) -> None:
    """PIL finds an eXIf chunk after IDAT only by decoding: the header alone would give the stored size."""
    path = str(tmp_path / "late.png")
    write_rotated_jpeg(path, np.zeros((50, 60, 3), np.uint8))
    with Image.open(path) as stored:
        stored.save(path, format="PNG", exif=stored.getexif())
    with open(path, "rb") as f:
        data = f.read()
    chunks, position = {}, 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunks[kind] = data[position : position + 12 + length]  # one of each kind here
        position += 12 + length
    with open(path, "wb") as f:  # the CRCs cover type and data: moving a chunk keeps them right
        f.write(data[:8] + b"".join(chunks[kind] for kind in (b"IHDR", b"IDAT", b"eXIf", b"IEND")))
    assert image_size(path) == checked_size(path) == (50, 60) == read_rgb(path).shape[:2]


@pytest.mark.parametrize("file_format", ["TIFF", "WEBP"])
def test_a_turned_image_of_another_format_has_the_size_it_is_read_with(tmp_path, file_format) -> None:
    """Pillow's TIFF reader reports an EXIF-turned TIFF upright already: its header size must not be turned again."""
    path = str(tmp_path / f"turned.{file_format.lower()}")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn a quarter: the 50 x 60 (width x height) picture stored is shown 60 x 50
    Image.fromarray(np.zeros((60, 50, 3), np.uint8)).save(path, format=file_format, exif=exif)
    assert image_size(path) == checked_size(path) == (50, 60) == read_rgb(path).shape[:2]


def test_training_refuses_before_writing_anything(tmp_path, capsys) -> None:
    root = write_coco(str(tmp_path / "c"))
    open(os.path.join(root, "val2017", "e.jpg"), "wb").close()
    out = tmp_path / "run"
    assert train_tool.main([SHAPES_CONFIG, *tiny_overrides(root, str(out), "data.synthetic=''")]) == 1
    err = capsys.readouterr().err
    assert "error: 1 of the 5 images of train2017" in err and "e.jpg (image id 2): the file is empty" in err
    assert not out.exists()


def test_evaluation_checks_the_validation_split_only(tmp_path) -> None:
    root = write_coco(str(tmp_path / "c"))
    open(os.path.join(root, "train2017", "a.jpg"), "wb").close()
    cfg = load_config(SHAPES_CONFIG, tiny_overrides(root, str(tmp_path / "e"), "data.synthetic=''"))
    assert len(training_build.build_data(cfg, ENV, train=False).val_set) == 2
    with pytest.raises(DatasetError, match=r"(?s)^1 of the 5 images of train2017 .*a\.jpg \(image id 1\)"):
        training_build.build_data(cfg, ENV)
    open(os.path.join(root, "val2017", "d.jpg"), "wb").close()
    with pytest.raises(DatasetError, match=r"(?s)^1 of the 2 images of val2017 .*d\.jpg \(image id 1\)"):
        training_build.build_data(cfg, ENV, train=False)


def test_the_generated_demo_set_is_not_checked(tmp_path, monkeypatch) -> None:
    """The synthetic set is written by this project, atomically: its start stays as fast as it was."""
    root = str(tmp_path / "shapes")
    make_shapes(root, train_images=8, val_images=4, image_size=64, max_objects=2)
    monkeypatch.setattr(training_build, "find_bad_images", lambda *args, **kwargs: pytest.fail("checked"))
    cfg = load_config(SHAPES_CONFIG, tiny_overrides(root, str(tmp_path / "run")))
    assert len(training_build.build_data(cfg, ENV).train_set) == 8


def test_an_output_dir_inside_the_data_folder_is_warned_about(tmp_path, capsys) -> None:
    """A run's files written among the user's data: said, with what to do (the run is not refused)."""
    root = write_coco(str(tmp_path / "c"))
    cfg = load_config(None, [f"data.root={root}", f"output_dir={os.path.join(root, 'runs', 'a')}"])
    with ExitStack() as held:
        training_build.prepare_output_dir(cfg, ENV, held)
    assert f"warning: output_dir {cfg.output_dir} is inside data.root {root}" in capsys.readouterr().out
    assert os.path.isdir(cfg.output_dir)
    beside = load_config(None, [f"data.root={root}", f"output_dir={tmp_path / 'c-runs'}"])  # a name that starts alike
    with ExitStack() as held:
        training_build.prepare_output_dir(beside, ENV, held)
    assert "warning" not in capsys.readouterr().out
