"""deformable.inference.Predictor: the Python entry point gives what tools/infer.py writes, for every image kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _viz_utils import shapes_image, tiny_config, tiny_model, write_checkpoint, write_image
from PIL import Image

from deformable.inference import Detections, ImageError, Predictor, as_rgb, read_image
from deformable.inference.run import run_inference
from models.config import config_to_dict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("predictor")
    model, cfg = tiny_model(), tiny_config()
    named = root / "named.pth"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": {1: "cat", 3: "dog"}}, named)
    return {
        "checkpoint": write_checkpoint(str(root / "checkpoint.pth"), model, cfg),
        "named": str(named),
        "wide": write_image(str(root / "wide.png"), shapes_image(60, 80)),  # lossless: decodes to the array
        "small": write_image(str(root / "small.png"), shapes_image(30, 30, seed=1)),  # resized within the wide one
    }


@pytest.fixture(scope="module")
def predictor(files) -> Predictor:
    return Predictor(files["checkpoint"], device="cpu", threshold=0.0)


def assert_same(a: Detections, b: Detections) -> None:
    assert a.image_size == b.image_size and a.names == b.names
    torch.testing.assert_close(a.labels, b.labels, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-4)


def test_a_path_gives_what_infer_writes(tmp_path, files, predictor) -> None:
    found = predictor(files["wide"])
    assert isinstance(found, Detections) and found.image_size == (60, 80) and len(found) > 0
    assert found.boxes.shape == (len(found), 4) and found.boxes.dtype == torch.float32
    assert torch.all(found.scores[:-1] >= found.scores[1:])  # highest score first
    written = run_inference(
        tiny_config(), files["checkpoint"], [files["wide"]], str(tmp_path), score_threshold=0.0,
        device=torch.device("cpu"), show_progress=False,
    ).results  # fmt: skip
    assert len(written) == len(found)
    for entry, mine in zip(written, found.to_coco(1), strict=True):
        assert entry["category_id"] == mine["category_id"] and entry["score"] == pytest.approx(mine["score"], abs=1e-6)
        assert entry["bbox"] == pytest.approx(mine["bbox"], abs=1e-4)


def test_every_image_kind_gives_the_same_detections(files, predictor) -> None:
    rgb = shapes_image(60, 80)
    expected = predictor(files["wide"])
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    for image in (rgb, Image.fromarray(rgb), chw, chw.float() / 255, rgba):
        assert_same(predictor(image), expected)


def test_grey_images_are_read_as_three_equal_channels(predictor) -> None:
    grey = shapes_image(50, 50)[:, :, 0]
    expected = predictor(np.repeat(grey[:, :, None], 3, axis=2))
    for image in (grey, grey[:, :, None], Image.fromarray(grey), torch.from_numpy(grey)[None]):
        assert_same(predictor(image), expected)


def test_a_list_gives_a_list_and_batching_keeps_each_image(files, predictor) -> None:
    alone = [predictor(files["wide"]), predictor(files["small"])]
    batched = Predictor(files["checkpoint"], device="cpu", threshold=0.0, batch_size=2)([files["wide"], files["small"]])
    assert isinstance(batched, list) and [d.image_size for d in batched] == [(60, 80), (30, 30)]
    # The larger image is not padded in the batch; near-equal scores may swap places, so pair them up.
    assert batched[0].image_size == alone[0].image_size and len(batched[0]) == len(alone[0])
    for label, score, box in zip(alone[0].labels, alone[0].scores, alone[0].boxes, strict=True):
        same = (batched[0].labels == label) & ((batched[0].scores - score).abs() < 1e-5)
        assert any(torch.allclose(other, box, atol=1e-3) for other in batched[0].boxes[same])
    assert predictor([]) == []
    assert len(predictor((files["small"],))) == 1


def test_by_default_each_image_is_detected_alone_as_infer_does(tmp_path, files, predictor) -> None:
    """Predictor and infer agree on one image per pass, so a list gives each image's own detections; a batch pads
    the smaller image, which moves its detections (the reason the default is 1)."""
    small = predictor(files["small"])
    assert_same(predictor([files["wide"], files["small"]])[1], small)
    padded = Predictor(files["checkpoint"], device="cpu", threshold=0.0, batch_size=2)([files["wide"], files["small"]])
    assert not torch.allclose(padded[1].boxes, small.boxes, atol=1e-3)
    run = run_inference(
        tiny_config(), files["checkpoint"], [files["wide"], files["small"]], str(tmp_path), score_threshold=0.0,
        device=torch.device("cpu"), show_progress=False,
    )  # fmt: skip
    written = [entry for entry in run.results if entry["image_id"] == 2]
    assert len(written) == len(small)
    for entry, mine in zip(written, small.to_coco(2), strict=True):
        assert entry["score"] == pytest.approx(mine["score"], abs=1e-6)
        assert entry["bbox"] == pytest.approx(mine["bbox"], abs=1e-4)


def test_pil_images_are_decoded_as_their_files(tmp_path) -> None:
    """16-bit pixels scaled (not clipped to white) and the EXIF orientation applied, as for a path."""
    deep = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 31).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    for image in (Image.fromarray(deep), Image.open(tmp_path / "deep.png")):
        assert image.mode.startswith("I")
        np.testing.assert_array_equal(as_rgb(image), read_image(str(tmp_path / "deep.png")))
    assert as_rgb(Image.fromarray(deep)).max() < 255  # the largest value, 61969, is not white

    upright = shapes_image(30, 50)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # sideways, with the tag to turn it back
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)
    opened = Image.open(tmp_path / "phone.jpg")
    pixels = as_rgb(opened)
    assert pixels.shape == (30, 50, 3) and opened.size == (30, 50)  # upright; the caller's image is not turned
    np.testing.assert_array_equal(pixels, read_image(str(tmp_path / "phone.jpg")))


def test_the_threshold_keeps_the_scores_at_or_above_it(files, predictor) -> None:
    everything = predictor(files["wide"])
    cut = float(everything.scores[len(everything) // 2])
    kept = predictor(files["wide"], threshold=cut)
    assert len(kept) == int((everything.scores >= cut).sum()) and torch.all(kept.scores >= cut)
    assert len(predictor(files["wide"], threshold=1.0)) == 0


def test_class_names_label_the_detections_and_other_labels_are_dropped(files) -> None:
    found = Predictor(files["named"], device="cpu", threshold=0.0)(files["wide"])
    assert len(found) > 0 and set(found.labels.tolist()) <= {1, 3}
    assert found.names == tuple({1: "cat", 3: "dog"}[int(label)] for label in found.labels)
    unnamed = Predictor(files["checkpoint"], device="cpu", threshold=0.0)(files["wide"])
    assert unnamed.names == tuple(str(int(label)) for label in unnamed.labels)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), "must be uint8 (H, W, 3) RGB, got dtype float32"),
        (np.zeros((8, 8, 2), np.uint8), "got (8, 8, 2)"),
        (np.zeros((0, 8, 3), np.uint8), "got (0, 8, 3)"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "must be (3, H, W) or (1, H, W), got (8, 8, 3)"),
        (torch.full((3, 8, 8), 2.0), "must lie in [0, 1], got values in [2.0, 2.0]"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), "uint8 or float in [0, 1], got torch.int32"),
        ([[1, 2]], "got list"),
        (Image.fromarray(np.zeros((8, 8), np.float32)), "32-bit floating-point pixels"),
        ("/nonexistent/photo.jpg", "image /nonexistent/photo.jpg does not exist"),
    ],
)
def test_bad_images_are_named(image, message) -> None:
    with pytest.raises(ImageError) as error:
        as_rgb(image, "image 3")
    assert message in str(error.value)
    assert "image 3" in str(error.value) or "photo.jpg" in str(error.value)


def test_bad_arguments(files, predictor) -> None:
    with pytest.raises(ImageError, match="image 1: a numpy image must be uint8"):
        predictor([files["wide"], np.zeros((4, 4, 3), np.float64)])
    with pytest.raises(ValueError, match=r"threshold must be a score in \[0, 1\], got 1.5"):
        predictor(files["wide"], threshold=1.5)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        Predictor(files["checkpoint"], device="cpu", batch_size=0)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Predictor(files["checkpoint"].replace("checkpoint.pth", "missing.pth"), device="cpu")


# --- the notebook sweep (2026-12-07): argument types, devices, read-only arrays, ids, empty PIL images ----------------


def test_argument_types_are_named(files, predictor) -> None:
    from models.config import ConfigError

    with pytest.raises(TypeError, match=r"Predictor: threshold must be a number in \[0, 1\], got str '0.5'"):
        predictor(files["wide"], threshold="0.5")
    with pytest.raises(TypeError, match="Predictor: batch_size must be an integer, got float 2.0"):
        Predictor(files["checkpoint"], device="cpu", batch_size=2.0)
    with pytest.raises(ConfigError, match=r"overrides must be a list .*got the string 'data.val_size=96'"):
        Predictor(files["checkpoint"], device="cpu", overrides="data.val_size=96")
    with pytest.raises(TypeError, match="to_coco: image_id must be an integer"):
        predictor(files["wide"]).to_coco("abc")
    entries = predictor(files["wide"]).to_coco(np.int64(3))
    assert entries and all(type(entry["image_id"]) is int and entry["image_id"] == 3 for entry in entries)


def test_devices_by_name_index_or_torch_device(files) -> None:
    from models.config import ConfigError

    found = Predictor(files["checkpoint"], device=torch.device("cpu"), threshold=0.0)
    assert found.device == torch.device("cpu") and len(found(files["wide"])) > 0
    with pytest.raises(ConfigError, match=r"device must be one of auto, cpu, cuda or cuda:<index>, got 'gpu'"):
        Predictor(files["checkpoint"], device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda:0 but torch sees no CUDA device"):
            Predictor(files["checkpoint"], device="cuda:0")


def test_read_only_arrays_and_empty_pil_images(files, predictor) -> None:
    import warnings

    array = np.asarray(Image.open(files["wide"]).convert("RGB"))
    assert not array.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a tensor over a read-only array
        assert_same(predictor(array), predictor(files["wide"]))
    with pytest.raises(ImageError, match=r"image 0: a PIL image of size 0x5 \(width x height\) has no pixels"):
        predictor([Image.new("RGB", (0, 5))])
