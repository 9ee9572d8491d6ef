"""Videos: tools/infer.py writes the drawn frames and a per-frame JSON, Predictor.video yields the same detections
frame by frame, every stride-th frame only when asked, and unreadable videos are named and skipped."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from _repo import load_tool
from _viz_utils import shapes_image, tiny_config, tiny_model, tool_argv_config, write_checkpoint, write_image

from deformable.inference import ImageError, Predictor, list_images, read_frames, video_info
from deformable.inference.video import VIDEO_EXTENSIONS

pytestmark = pytest.mark.usefixtures("one_thread")

infer = load_tool("infer")
FRAMES, FPS, HEIGHT, WIDTH = 7, 10.0, 48, 64


def write_video(path: str, frames: list[np.ndarray], fps: float = FPS) -> str:
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("video")
    frames = [shapes_image(HEIGHT, WIDTH, seed=i) for i in range(FRAMES)]
    (root / "broken.mp4").write_text("not a video")
    return {
        "video": write_video(str(root / "street.mp4"), frames),
        "image": write_image(str(root / "street.png"), shapes_image(40, 40, seed=9)),
        "broken": str(root / "broken.mp4"),
        "checkpoint": write_checkpoint(str(root / "checkpoint.pth"), tiny_model(), tiny_config()),
    }


def test_frames_are_read_in_order_every_stride(files) -> None:
    info = video_info(files["video"])
    assert (info.frames, info.width, info.height) == (FRAMES, WIDTH, HEIGHT) and info.fps == pytest.approx(FPS)
    frames = list(read_frames(files["video"]))
    assert [i for i, _ in frames] == list(range(FRAMES))
    assert all(f.shape == (HEIGHT, WIDTH, 3) and f.dtype == np.uint8 for _, f in frames)
    # Decoded as RGB: the red rectangle of shapes_image stays red (MPEG-4 is lossy, so roughly).
    red = frames[0][1][HEIGHT // 4, WIDTH // 4].astype(int)
    assert red[0] > 150 and red[2] < 100
    assert [i for i, _ in read_frames(files["video"], stride=3)] == [0, 3, 6]
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        next(read_frames(files["video"], stride=0))


def test_predictor_video_gives_each_frame_what_the_predictor_gives_the_image(files) -> None:
    predictor = Predictor(files["checkpoint"], device="cpu", threshold=0.0)
    seen = list(predictor.video(files["video"], stride=2))
    assert [f.index for f in seen] == [0, 2, 4, 6]
    assert [f.time_s for f in seen] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    for frame in seen:
        alone = predictor(frame.image)
        assert len(frame.detections) == len(alone) > 0
        torch.testing.assert_close(frame.detections.boxes, alone.boxes)
        torch.testing.assert_close(frame.detections.scores, alone.scores)


def test_infer_writes_the_drawn_video_and_its_detections(files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    argv = [*tool_argv_config(tmp_path), files["video"], files["image"], "--checkpoint", files["checkpoint"]]
    argv += ["--out", str(out), "--score-threshold", "0.0", "--device", "cpu", "--video-stride", "2"]
    assert infer.main(argv) == 0, capsys.readouterr().err
    assert "in 1 images and 1 video(s)" in capsys.readouterr().out
    # the video, listed first, is street.mp4 and street.json; the image's drawing does not collide with them
    assert {"street.mp4", "street.json", "street_1.jpg", "results.json", "images.json"} <= set(os.listdir(out))
    with open(out / "images.json") as f:
        assert [os.path.basename(i["file_name"]) for i in json.load(f)] == ["street.png"]
    with open(out / "street.json") as f:
        written = json.load(f)
    assert (written["video"], written["width"], written["height"], written["stride"]) == (
        files["video"],
        WIDTH,
        HEIGHT,
        2,
    )
    assert [frame["frame"] for frame in written["frames"]] == [0, 2, 4, 6]
    predictor = Predictor(files["checkpoint"], device="cpu", threshold=0.0)
    for frame, expected in zip(written["frames"], predictor.video(files["video"], stride=2), strict=True):
        assert frame["time_s"] == pytest.approx(expected.time_s)
        assert [d["score"] for d in frame["detections"]] == pytest.approx(expected.detections.scores.tolist())
        assert all(set(d) == {"category_id", "name", "bbox", "score"} for d in frame["detections"])
    drawn = video_info(str(out / "street.mp4"))
    assert (drawn.frames, drawn.width, drawn.height) == (4, WIDTH, HEIGHT) and drawn.fps == pytest.approx(FPS / 2)
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]  # staged files renamed into place


def test_an_unreadable_video_is_skipped_and_named(files, tmp_path, capsys) -> None:
    out = str(tmp_path / "out")
    argv = [*tool_argv_config(tmp_path), files["broken"], files["image"], "--checkpoint", files["checkpoint"]]
    assert infer.main([*argv, "--out", out, "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert f"cannot read video {files['broken']}" in err and "skipped" in err
    assert not os.path.exists(os.path.join(out, "broken.json"))
    argv = [*tool_argv_config(tmp_path), files["broken"], "--checkpoint", files["checkpoint"]]
    assert infer.main([*argv, "--out", str(tmp_path / "none"), "--device", "cpu"]) == 1
    assert "none of the 1 inputs could be read" in capsys.readouterr().err


def test_folders_contribute_videos_to_infer_and_bad_options_are_named(files, tmp_path, capsys) -> None:
    folder = os.path.dirname(files["video"])
    listed = list_images([folder], (".png", *VIDEO_EXTENSIONS))
    assert files["video"] in listed and files["image"] in listed and files["broken"] in listed
    assert files["video"] not in list_images([folder])  # images only, unless asked
    with pytest.raises(ImageError, match="input missing.mp4 does not exist"):
        list_images(["missing.mp4"], VIDEO_EXTENSIONS)
    argv = [*tool_argv_config(tmp_path), files["video"], "--checkpoint", files["checkpoint"], "--video-stride", "0"]
    with pytest.raises(SystemExit, match="2"):
        infer.main(argv)
    assert "--video-stride must be >= 1, got 0" in capsys.readouterr().err
