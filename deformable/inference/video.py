"""Video files frame by frame (OpenCV's FFmpeg reader): what :meth:`Predictor.video` and ``tools/infer.py`` detect on.

    for frame in Predictor("runs/x/checkpoint.pth").video("street.mp4", stride=2):
        print(frame.index, frame.time_s, len(frame.detections))

Frames are decoded as RGB, upright (OpenCV applies the rotation a phone records), and given to the detector exactly
as images are. A frame that cannot be decoded ends the video early with a warning (a truncated file): the frames
before it are kept.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import cv2
import numpy as np

from .images import ImageError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
DEFAULT_FPS = 25.0  # written for a video whose header states no frame rate (a warning says so)


def is_video(path: str) -> bool:
    """Whether ``path`` names a video file, by its extension."""
    return path.lower().endswith(VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header states: ``fps`` (frames per second; 0 when unknown), ``frames`` (the count, 0 when
    unknown: some containers do not state it), ``width`` and ``height`` in pixels."""

    fps: float
    frames: int
    width: int
    height: int


def _open(path: str) -> cv2.VideoCapture:
    if os.path.isdir(path):
        raise ImageError(f"video {path} is a folder, not a video file")
    if not os.path.isfile(path):
        raise ImageError(f"video {path} does not exist")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise ImageError(f"cannot read video {path}: OpenCV's FFmpeg reader cannot open it (corrupt, or unknown codec)")
    return capture


def video_info(path: str) -> VideoInfo:
    """The header of the video ``path``.

    Raises:
        ImageError: the file is missing, a folder, or cannot be opened as a video (the message names it).
    """
    capture = _open(path)
    try:
        fps = capture.get(cv2.CAP_PROP_FPS)
        return VideoInfo(
            fps=fps if np.isfinite(fps) and fps > 0 else 0.0,
            frames=max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0),
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        capture.release()


def read_frames(
    path: str, stride: int = 1, warn: Callable[[str], None] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, frame)`` for every ``stride``-th frame of the video ``path`` (indices 0, stride, 2 stride, ...);
    each frame ``(H, W, 3)`` uint8 RGB. A video shorter than its header says is reported to ``warn`` (by default
    :func:`warnings.warn`).

    Raises:
        ValueError: ``stride`` < 1. ImageError: the video cannot be opened, or no frame can be decoded.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    capture = _open(path)
    expected = max(int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    index = 0
    try:
        while True:
            if not capture.grab():  # the next frame, not decoded: skipped frames cost no decoding
                break
            if index % stride == 0:
                ok, frame = capture.retrieve()
                if not ok:
                    break
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise ImageError(f"cannot read video {path}: no frame could be decoded")
    if expected and index < expected - 1:  # headers may count one frame more than there is
        message = f"video {path}: its header states {expected} frames, {index} could be read"
        (warn or (lambda text: warnings.warn(text, stacklevel=3)))(message)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last may be shorter); ``itertools.batched`` from Python 3.12."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
