"""Detection over image files: batches with padding, a COCO-format results file and, with a drawing function passed
in (:func:`deformable.viz.detections.draw_detections`, a layer above this one), annotated images.

Nothing a user saved is lost: with drawing, the output folder may not be one that holds an input (so a drawn image
never lands on or among the inputs), an existing file of the output folder is replaced or removed only when an earlier
run wrote it (:class:`~.outputs.OutputFolder` keeps the list), and every file is written atomically.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from tqdm import tqdm

from deformable.data import DatasetError, DatasetIndex, dataset_index
from deformable.data.coco_eval import to_coco_results
from deformable.data.decode import image_size
from models import build_postprocessor
from models.config import Config, DataConfig

from .images import ImageError, prepare_batch, read_image
from .outputs import IMAGES, RESULTS, OutputFolder, check_out_dir_holds_no_input, output_names
from .outputs import MANIFEST as MANIFEST  # where the tests and earlier callers found it
from .predictor import (
    DEFAULT_BATCH_SIZE,
    check_count,
    check_threshold,
    class_names,
    detect,
    load_detector,
    select_detections,
)
from .video import DEFAULT_FPS, VideoInfo, batched, is_video, read_frames, video_info

# (image (H, W, 3) RGB, one result: scores (k,), labels (k,), boxes (k, 4) xyxy pixels, id -> name) -> BGR image
DrawDetections = Callable[[np.ndarray, Mapping[str, torch.Tensor], Mapping[int, str]], np.ndarray]


@dataclass(frozen=True)
class InferenceRun:
    """What :func:`run_inference` wrote: ``results`` (results.json), ``images`` (images.json), ``skipped``
    (unreadable input path -> the reason, each reported as a warning when met), ``videos`` (the videos
    detected on, each with its ``<stem>.json``) and ``removed`` (the names of the files an earlier run had written to
    the output folder that this one did not write again, removed)."""

    results: list[dict]
    images: list[dict]
    skipped: dict[str, str] = field(default_factory=dict)
    videos: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def image_ids(paths: Sequence[str], index: DatasetIndex) -> dict[str, int]:
    """Path -> image id in results.json and images.json.

    An image of the data set (``index``: :func:`dataset_index`) keeps its id there, matched by its path, or else by
    its file name where its size (read from its header) is the one the data set gives that image, so that the
    results can be scored against it; where several inputs match one image, the first listed gets it. Every other
    image gets an id above the data set's largest (1, 2, ... without a data set), in the order given, so that no id
    can point at another image of it. images.json maps the ids to the files.
    """
    known = index.image_ids
    next_id = max(known.values(), default=0) + 1
    ids: dict[str, int] = {}
    taken: set[int] = set()
    for path in paths:
        if path in ids:
            continue
        own = known.get(os.path.realpath(path))
        if own is None:
            own = known.get(os.path.basename(path))
            if own is not None and _header_size(path) != index.image_sizes.get(own):
                own = None  # another picture of the same name
        if own is None or own in taken:
            own, next_id = next_id, next_id + 1
        ids[path] = own
        taken.add(own)
    return ids


def _header_size(path: str) -> tuple[int, int] | None:
    """``(height, width)`` of the image file ``path`` as read (EXIF orientation applied); None when unreadable."""
    try:
        return image_size(path)
    except DatasetError:
        return None


def result_category_ids(
    dataset_names: Mapping[int, str], checkpoint_names: Mapping[int, str]
) -> tuple[dict[int, int], list[str]]:
    """The category ids results.json writes, where they differ from the checkpoint's labels: a class the data set
    names gets the data set's id (its annotation file's, as ``tools/eval.py`` writes its detections), so that the
    results score against it; a class of the checkpoint the data set lacks keeps its id unless one of the data set's
    classes has it (then one above every id). Nothing changes when either names no class or they share no name.

    Returns:
        ``(label -> category id, messages)``, empty when nothing changes.
    """
    by_name = {name: cat_id for cat_id, name in dataset_names.items()}
    if not set(by_name) & set(checkpoint_names.values()):
        return {}, []
    fresh = max(*dataset_names, *checkpoint_names) + 1
    ids: dict[int, int] = {}
    for label, name in sorted(checkpoint_names.items()):
        if name in by_name:
            ids[label] = by_name[name]
        elif label in dataset_names:
            ids[label], fresh = fresh, fresh + 1
    moved = {label: cat_id for label, cat_id in ids.items() if cat_id != label}
    if not moved:
        return {}, []
    changes = ", ".join(f"{checkpoint_names[label]} {label} -> {cat_id}" for label, cat_id in moved.items())
    return moved, [f"results.json: category ids are the data set's (where the checkpoint's differ): {changes}"]


def run_inference(
    cfg: Config,
    checkpoint: str | None,
    paths: Sequence[str],
    out_dir: str,
    *,
    score_threshold: float = 0.3,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device,
    show_progress: bool = True,
    draw: DrawDetections | None = None,
    warn: Callable[[str], None] | None = None,
    video_stride: int = 1,
) -> InferenceRun:
    """Detects on ``paths`` (images, and videos by their extension: :data:`~.video.VIDEO_EXTENSIONS`) and writes
    ``out_dir/results.json`` (COCO results of the images' detections >= ``score_threshold`` whose label the
    checkpoint names, as :class:`~deformable.inference.Predictor` returns them: ``image_id``, ``category_id``,
    ``bbox`` xywh, ``score``; where the config's data set numbers the checkpoint's classes otherwise, its category
    ids: :func:`result_category_ids`), ``out_dir/images.json`` (COCO ``images`` entries: ``id``, ``file_name``,
    ``height``, ``width``; ids as :func:`image_ids` gives them; and ``drawn``, the drawing's file name in ``out_dir``,
    null without ``draw``) and, with ``draw``, ``out_dir/<stem>.jpg`` (``<stem>_<n>.jpg`` where stems repeat:
    :func:`~.outputs.output_names`): the image ``draw`` returns for those same detections (``tools/infer.py`` passes
    :func:`deformable.viz.detections.draw_detections`). A video gives ``out_dir/<stem>.json`` (its frame rate, size,
    ``drawn`` and, for every ``video_stride``-th frame, the index, time and detections) and, with ``draw``,
    ``<stem>.mp4``: those frames drawn, at the frame rate divided by ``video_stride`` (a video's ``category_id`` is the
    checkpoint's label, with its ``name``).

    Before any work: with ``draw``, an ``out_dir`` that holds an input is refused; an existing file of ``out_dir``
    that no earlier run wrote is never replaced (:class:`~.outputs.OutputFolder`). An image or video that cannot be
    read is skipped: ``warn`` (by default :func:`warnings.warn`) is called with a message naming it and the run goes
    on. ``batch_size`` > 1 pads the smaller images of a batch, which may change their detections slightly. Once all is
    written, the files an earlier run wrote to ``out_dir`` that this one did not write again are removed (never an
    input); a run that fails removes nothing.

    Raises:
        ValueError: a batch size or stride < 1 or a threshold outside [0, 1] (TypeError: not a number).
        FolderError: ``out_dir`` cannot be
        used, or a drawn image or video cannot be written (naming the file). ImageError: no input could be read.
    """
    check_count(batch_size, "batch_size")
    check_count(video_stride, "video_stride")
    check_threshold(score_threshold, "score_threshold")
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    paths = _distinct(paths)
    if draw is not None:
        check_out_dir_holds_no_input(paths, out_dir)
    model, state = load_detector(cfg, checkpoint, device)  # a checkpoint that does not fit: nothing written yet
    videos = [path for path in paths if is_video(path)]
    stills = [path for path in paths if not is_video(path)]
    index = dataset_index(cfg.data)
    known, dataset_names = index.image_ids, index.class_names
    named = (state is not None and state.config is not None) or cfg.data.root != DataConfig().root
    if stills and not known and named and cfg.data.root and not os.path.isdir(cfg.data.root):
        warn(
            f"the config's data set (data.root={cfg.data.root}) is not found from {os.getcwd()}: image ids start at 1 "
            "and may be those of other images in it; run from the folder its path is relative to, or pass "
            "data.root=PATH"
        )
    ids, files = image_ids(stills, index), output_names(paths)
    stems = {path: os.path.splitext(files[path])[0] for path in videos}
    drawings = [files[path] for path in stills] + [stems[path] + ".mp4" for path in videos] if draw is not None else []
    postprocessor = build_postprocessor(cfg)
    names = class_names(cfg, state)
    categories, notes = result_category_ids(dataset_names, names) if known else ({}, [])
    for note in notes:
        warn(note)
    folder = OutputFolder(out_dir)
    folder.claim([RESULTS, IMAGES, *drawings, *(stems[path] + ".json" for path in videos)])
    results: list[dict] = []
    images: list[dict] = []
    skipped: dict[str, str] = {}

    def skip(path: str, reason: str) -> None:
        skipped[path] = reason
        warn(f"{reason}; skipped")

    def detect_kept(pictures: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        """Each picture's detections as written and drawn (:func:`select_detections`)."""
        sizes = torch.tensor([p.shape[:2] for p in pictures])
        _, detections = detect(model, postprocessor, *prepare_batch(pictures, cfg.data), sizes)
        return [select_detections(found, score_threshold, names) for found in detections]

    def write_drawn(path: str, picture: np.ndarray, kept: dict[str, torch.Tensor]) -> str | None:
        return None if draw is None else folder.write_drawn(files[path], draw(picture, kept, names), path, warn)

    draw_frame = None if draw is None else (lambda picture, kept: draw(picture, kept, names))
    options = dict(batch_size=batch_size, stride=video_stride, names=names, warn=warn, progress=show_progress)
    try:  # a run that fails removes nothing and leaves the manifest listing what is there
        found = _detect_images(stills, detect_kept, write_drawn, skip, batch_size=batch_size, progress=show_progress)
        for path, (height, width), kept, drawn in found:
            results += [
                {**entry, "category_id": categories.get(entry["category_id"], entry["category_id"])}
                for entry in to_coco_results(ids[path], kept)
            ]
            images.append({"id": ids[path], "file_name": path, "height": height, "width": width, "drawn": drawn})
        for path in videos:
            try:
                _detect_video(path, folder, stems[path], draw_frame, detect_kept, **options)
            except ImageError as exc:
                skip(path, str(exc))
        if paths and len(skipped) == len(paths):
            first = next(iter(skipped.values()))
            raise ImageError(f"none of the {len(paths)} inputs could be read ({first}); nothing was written")
        folder.write_text(RESULTS, json.dumps(results))
        folder.write_text(IMAGES, json.dumps(images))
    except BaseException:
        folder.abandon()
        raise
    removed = folder.finish(paths, warn)  # what earlier runs wrote for inputs not given now, or under other names
    return InferenceRun(results, images, skipped, [path for path in videos if path not in skipped], removed)


def _detect_video(
    path: str,
    folder: OutputFolder,
    stem: str,
    draw_frame: Callable[[np.ndarray, dict[str, torch.Tensor]], np.ndarray] | None,
    detect_kept: Callable[[list[np.ndarray]], list[dict[str, torch.Tensor]]],
    *,
    batch_size: int,
    stride: int,
    names: Mapping[int, str],
    warn: Callable[[str], None],
    progress: bool,
) -> None:
    """One video: ``folder/<stem>.json`` and, with ``draw_frame``, the drawn frames as ``folder/<stem>.mp4``
    (MPEG-4, written beside and renamed into place once complete; a size OpenCV's writer refuses gets the JSON
    alone, with a warning). A video that states no frame rate is drawn at :data:`DEFAULT_FPS` (said), and its
    frames' ``time_s`` are null."""
    info = video_info(path)
    if info.fps == 0:
        warn(f"video {path} states no frame rate: drawn at {DEFAULT_FPS} frames per second, frame times unknown")
    frames: list[dict] = []

    def run(writer: cv2.VideoWriter | None) -> None:
        frames.clear()  # a second pass (the writer refused) starts afresh
        total = -(-info.frames // stride) if info.frames else None
        bar = tqdm(total=total, desc=os.path.basename(path), unit="frame", disable=not progress, leave=False)
        with bar:
            for chunk in batched(read_frames(path, stride, warn), batch_size):
                for (index, picture), kept in zip(chunk, detect_kept([p for _, p in chunk]), strict=True):
                    if writer is not None:
                        writer.write(draw_frame(picture, kept))
                    entries = to_coco_results(index, kept)
                    for entry in entries:
                        del entry["image_id"]
                        entry["name"] = names.get(entry["category_id"], str(entry["category_id"]))
                    time_s = round(index / info.fps, 4) if info.fps else None
                    frames.append({"frame": index, "time_s": time_s, "detections": entries})
                bar.update(len(chunk))

    drawn = None if draw_frame is None else stem + ".mp4"
    if drawn is None:
        run(None)
    else:
        try:
            folder.save(drawn, lambda staged: _write_video(staged, info, (info.fps or DEFAULT_FPS) / stride, run))
        except _NoVideoWriter as exc:
            target = os.path.join(folder.path, drawn)
            warn(f"cannot write the drawn video {target}: {exc}; its detections are in {stem}.json")
            drawn = None
            run(None)
    summary = {"video": path, "fps": info.fps, "width": info.width, "height": info.height, "stride": stride}
    folder.write_text(stem + ".json", json.dumps({**summary, "drawn": drawn, "frames": frames}))


class _NoVideoWriter(RuntimeError):
    """OpenCV cannot open a writer for the drawn video (its size); the video's detections are still written."""


def _write_video(target: str, info: VideoInfo, fps: float, run: Callable[[cv2.VideoWriter], None]) -> None:
    writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"mp4v"), fps, (info.width, info.height))
    if not writer.isOpened():  # before any frame is read: nothing to undo
        raise _NoVideoWriter(
            f"OpenCV's MPEG-4 (mp4v) writer refuses a {info.width}x{info.height} video (too large or too small a "
            "side for MPEG-4)"
        )
    try:
        run(writer)
    finally:
        writer.release()


def _distinct(paths: Sequence[str]) -> list[str]:
    """``paths`` with a file named twice (a folder and one of its files, ``a.jpg`` and ``./a.jpg``) kept once, first
    place: twice in images.json it would be two images with one id."""
    seen: set[str] = set()
    kept = []
    for path in paths:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            kept.append(path)
    return kept


def _detect_images(
    paths: Sequence[str],
    detect_kept: Callable[[list[np.ndarray]], list[dict[str, torch.Tensor]]],
    write_drawn: Callable[[str, np.ndarray, dict[str, torch.Tensor]], str | None],
    skip: Callable[[str, str], None],
    *,
    batch_size: int,
    progress: bool,
) -> Iterator[tuple[str, tuple[int, int], dict[str, torch.Tensor], str | None]]:
    """Each readable image of ``paths``, in order: ``(path, (height, width), detections, the name of its drawing
    (None where none was drawn))``; an unreadable one is passed to ``skip``."""
    bar = tqdm(total=len(paths), desc="infer", unit="img", disable=not progress or not paths, dynamic_ncols=True)
    with bar:
        for batch in _readable_batches(paths, batch_size, skip, bar):
            for (path, picture), kept in zip(batch, detect_kept([picture for _, picture in batch]), strict=True):
                yield path, picture.shape[:2], kept, write_drawn(path, picture, kept)


def _readable_batches(
    paths: Sequence[str], batch_size: int, skip: Callable[[str, str], None], bar: tqdm
) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Batches of ``(path, RGB image)`` of up to ``batch_size`` readable images; each unreadable one is passed to
    ``skip`` with the reason (naming the file) instead of ending the run."""
    batch: list[tuple[str, np.ndarray]] = []
    for path in paths:
        try:
            batch.append((path, read_image(path)))
        except ImageError as exc:
            skip(path, str(exc))
            bar.update(1)
            continue
        if len(batch) == batch_size:
            yield batch
            bar.update(len(batch))
            batch = []
    if batch:
        yield batch
        bar.update(len(batch))
