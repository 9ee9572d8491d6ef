"""One image decoder for every tool: EXIF orientation applied (boxes and pixels agree), 16-bit scaled, sizes checked."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from _data_utils import COLOURS, SPLITS, write_coco, write_rotated_jpeg, write_yolo
from PIL import Image

from deformable.data import DatasetError, build_dataset
from deformable.data.decode import image_size, read_rgb
from deformable.inference import read_image
from models.config import DataConfig

CAT_RGB = COLOURS["cat"][::-1]


def upright_val_image() -> tuple[str, np.ndarray, list]:
    """Validation image "d" of the shared data set, as RGB pixels, with its boxes (x, y, w, h)."""
    stem, width, height, boxes = SPLITS["val"][0]
    picture = np.full((height, width, 3), 120, dtype=np.uint8)
    for name, (x, y, w, h) in boxes:
        picture[y : y + h, x : x + w] = COLOURS[name][::-1]
    return stem, picture, boxes


def test_exif_orientation_is_applied_to_pixels_and_header_sizes(tmp_path) -> None:
    _, upright, _ = upright_val_image()
    path = str(tmp_path / "turned.jpg")
    write_rotated_jpeg(path, upright)
    assert Image.open(path).size == (upright.shape[0], upright.shape[1])  # stored sideways
    assert image_size(path) == upright.shape[:2]
    pixels = read_rgb(path)
    assert pixels.shape == upright.shape and np.abs(pixels.astype(int) - upright).mean() < 3
    np.testing.assert_array_equal(read_image(path), pixels)  # inference decodes as training does


@pytest.mark.parametrize("layout", ["yolo", "coco"])
def test_boxes_land_on_their_objects_in_a_turned_photo(tmp_path, layout) -> None:
    """Annotations are made on the upright photo (as labelling tools show it); the box must cover the object."""
    root = str(tmp_path)
    (write_yolo if layout == "yolo" else write_coco)(root)
    stem, upright, boxes = upright_val_image()
    folder = os.path.join(root, "images", "val") if layout == "yolo" else os.path.join(root, "val2017")
    write_rotated_jpeg(os.path.join(folder, f"{stem}.jpg"), upright)
    dataset = build_dataset(DataConfig(root=root, num_workers=0), "val", transforms=False)
    index = [dataset.coco.imgs[i]["file_name"].endswith(f"{stem}.jpg") for i in dataset.ids].index(True)
    image, target = dataset[index]
    assert tuple(image.shape[1:]) == upright.shape[:2]
    (x0, y0, x1, y1), label = target["boxes"][0].round().int().tolist(), int(target["labels"][0])
    assert [x0, y0, x1 - x0, y1 - y0] == boxes[0][1] and label == 1  # the cat, as annotated
    inside = image[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].float().mean((1, 2))
    assert np.abs(inside.numpy() - np.array(CAT_RGB)).max() < 8


def test_an_image_of_another_size_than_its_annotations_is_named(tmp_path) -> None:
    root = str(tmp_path)
    write_coco(root)
    path = os.path.join(root, "annotations", "instances_val2017.json")
    with open(path) as f:
        payload = json.load(f)
    payload["images"][0]["width"] *= 2
    with open(path, "w") as f:
        json.dump(payload, f)
    dataset = build_dataset(DataConfig(root=root, num_workers=0), "val", transforms=False)
    info = payload["images"][0]
    with pytest.raises(DatasetError) as error:
        dataset[dataset.ids.index(info["id"])]
    message = str(error.value)
    assert info["file_name"] in message and "instances_val2017.json" in message
    assert f"is {info['width'] // 2}x{info['height']} (width x height" in message
    assert f"gives {info['width']}x{info['height']}" in message


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path) -> None:
    grey = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 31).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = read_rgb(str(tmp_path / "deep.png"))
    assert pixels.shape == (40, 50, 3) and pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels[:, :, 0], np.round(grey / 257.0).astype(np.uint8))
    assert (pixels[:, :, 0] == pixels[:, :, 2]).all()


def test_thirty_two_bit_grey_keeps_the_brightness_of_its_range(tmp_path) -> None:
    """Mode "I" (a 32-bit TIFF, or PIL's convert("I") of an 8-bit image) states no range: 0..255 values are 8-bit ones
    (kept, not divided into black), larger ones up to 65535 16-bit ones, and beyond that the image is refused."""
    from deformable.inference import as_rgb

    eight = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    np.testing.assert_array_equal(as_rgb(Image.fromarray(eight).convert("I"))[:, :, 1], eight)
    Image.fromarray(eight.astype(np.int32)).save(tmp_path / "eight.tif")
    assert Image.open(tmp_path / "eight.tif").mode == "I"
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "eight.tif"))[:, :, 0], eight)
    sixteen = eight.astype(np.int32) * 257
    Image.fromarray(sixteen).save(tmp_path / "sixteen.tif")
    np.testing.assert_array_equal(read_rgb(str(tmp_path / "sixteen.tif"))[:, :, 2], eight)
    Image.fromarray(sixteen * 4).save(tmp_path / "wide.tif")
    with pytest.raises(DatasetError, match=r"wide.tif: 32-bit integer pixels from 0 to 246720, outside the 8- and 16"):
        read_rgb(str(tmp_path / "wide.tif"))


def test_palette_transparency_is_read_without_warnings(tmp_path) -> None:
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[:, 6:] = (200, 30, 30)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = read_rgb(str(tmp_path / "p.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = np.array(Image.open(tmp_path / "p.png").convert("RGB"))  # the palette's colours
    np.testing.assert_array_equal(pixels, expected)


def test_unreadable_images_are_named(tmp_path) -> None:
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match=r"float\.tif: 32-bit floating-point pixels"):
        read_rgb(str(tmp_path / "float.tif"))
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:400])
    with pytest.raises(DatasetError, match=r"cannot read image .*cut\.jpg: .*[Tt]runcated"):
        read_rgb(str(tmp_path / "cut.jpg"))
    (tmp_path / "text.jpg").write_text("not an image")
    for call in (read_rgb, image_size):
        with pytest.raises(DatasetError, match=r"cannot read image .*text\.jpg"):
            call(str(tmp_path / "text.jpg"))
    with pytest.raises(DatasetError, match=r"cannot read image .*none\.jpg"):
        read_rgb(str(tmp_path / "none.jpg"))
