"""Detection over image files: batches with padding, a COCO-format results file and, with a drawing function passed
in (:func:`deformable.viz.detections.draw_detections`, a layer above this one), annotated images.

Nothing a user saved is lost: with drawing, the output folder may not be one that holds an input image (so a drawn
image never lands on or among the inputs), an existing file of the output folder is replaced only when an earlier run
wrote it (:class:`OutputFolder` keeps the list), and every file is written atomically.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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
from models.files import FolderError, atomic_save, atomic_write, atomic_write_text, make_dir, remove_stale_temp_files

from .images import ImageError, prepare_batch, read_image
from .predictor import DEFAULT_BATCH_SIZE, check_threshold, class_names, detect, load_detector, select_detections
from .video import DEFAULT_FPS, VideoInfo, batched, is_video, read_frames, video_info

# (image (H, W, 3) RGB, one result: scores (k,), labels (k,), boxes (k, 4) xyxy pixels, id -> name) -> BGR image
DrawDetections = Callable[[np.ndarray, Mapping[str, torch.Tensor], Mapping[int, str]], np.ndarray]

RESULTS, IMAGES = "results.json", "images.json"
# The files of the output folder that runs wrote, so that a later run may replace them and nothing else. Hidden, as
# tool metadata is; a run killed midway has already written it, so rerunning into the same folder works.
MANIFEST = ".infer-outputs.json"
JPEG_MAX_SIDE = 65500  # libjpeg's limit; a drawn image with a longer side is written as PNG


@dataclass(frozen=True)
class InferenceRun:
    """What :func:`run_inference` wrote: ``results`` (results.json), ``images`` (images.json), ``skipped``
    (unreadable input path -> the reason, each reported as a warning when met) and ``videos`` (the videos
    detected on, each with its ``<stem>.json``)."""

    results: list[dict]
    images: list[dict]
    skipped: dict[str, str] = field(default_factory=dict)
    videos: list[str] = field(default_factory=list)


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


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """Path -> ``<stem>.jpg``, the drawn image's name, with ``_<n>`` added where stems repeat or are those of
    results.json, images.json and the manifest (a video's outputs are ``<stem>.mp4`` and ``<stem>.json``)."""
    names: dict[str, str] = {}
    used = {os.path.splitext(name)[0] + ".jpg" for name in (RESULTS, IMAGES, MANIFEST)}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = f"{stem}.jpg", 1
        while name in used:
            name, n = f"{stem}_{n}.jpg", n + 1
        used.add(name)
        names[path] = name
    return names


def check_out_dir_holds_no_input(paths: Iterable[str], out_dir: str) -> None:
    """Refuses an output folder that holds one of the input images (through a link too): drawn images written there
    would sit among the user's photos and could replace one of them.

    Raises:
        FolderError: naming the input file and suggesting another folder.
    """
    if not os.path.isdir(out_dir):
        return  # a folder still to be made holds nothing
    for path in paths:
        folders = {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}
        if any(os.path.samefile(folder, out_dir) for folder in folders if os.path.isdir(folder)):
            norm = os.path.normpath(out_dir)
            other = "detections" if os.path.basename(norm) in (".", "..", "") else f"{norm}_detections"
            raise FolderError(
                f"the output folder {out_dir} holds the input image {path}: the drawn images would be written among "
                f"your images and could replace them; choose another output folder (e.g. --out {other})"
            )


class OutputFolder:
    """The output folder of a run: a file may be written there when it does not exist yet or when an earlier run
    wrote it (the names in :data:`MANIFEST`); any other existing file is refused, never replaced."""

    def __init__(self, path: str) -> None:
        make_dir(path, "the output folder")
        remove_stale_temp_files(path)  # what a killed run was writing (a drawn video, beside its place)
        self.path = path
        self.owned = self._earlier_outputs()

    def _earlier_outputs(self) -> set[str]:
        try:
            with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as f:
                return {name for name in json.load(f)["files"] if isinstance(name, str)}
        except FileNotFoundError:
            return self._outputs_before_the_manifest()
        except (OSError, ValueError, KeyError, TypeError):
            return set()  # unreadable: nothing in the folder is known to be ours

    def _outputs_before_the_manifest(self) -> set[str]:
        """A folder that a version without the manifest wrote: its images.json lists the inputs, whose drawn names
        :func:`output_names` gives (the same naming, in the same order)."""
        try:
            with open(os.path.join(self.path, IMAGES), encoding="utf-8") as f:
                files = [entry["file_name"] for entry in json.load(f)]
        except (OSError, ValueError, KeyError, TypeError):
            return set()  # missing or not infer's images.json
        if not all(isinstance(name, str) for name in files):
            return set()
        return {RESULTS, IMAGES, *output_names(files).values()}

    def claim(self, names: Iterable[str]) -> None:
        """Checks that every one of ``names`` may be written, then records them as this tool's (before they are
        written, so that a run killed midway leaves a folder that the next run may write into).

        Raises:
            FolderError: some of ``names`` exist and no earlier run wrote them (the message names them).
        """
        names = list(names)
        foreign = [n for n in names if n not in self.owned and os.path.lexists(os.path.join(self.path, n))]
        if foreign:
            shown = ", ".join(os.path.join(self.path, n) for n in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise FolderError(
                f"the output folder {self.path} already holds {shown}{more}, which no earlier run of infer wrote: "
                "infer never replaces such a file; move it away or choose another output folder (--out)"
            )
        if not set(names) <= self.owned:
            self.owned |= set(names)
            atomic_write_text(os.path.join(self.path, MANIFEST), json.dumps({"files": sorted(self.owned)}))

    def release_unwritten(self, names: Iterable[str]) -> None:
        """Forgets those of ``names`` that were claimed but not written (a skipped input's), so that the manifest
        lists only what this tool wrote; a file there stays this tool's."""
        unwritten = {n for n in names if n in self.owned and not os.path.lexists(os.path.join(self.path, n))}
        if unwritten:
            self.owned -= unwritten
            atomic_write_text(os.path.join(self.path, MANIFEST), json.dumps({"files": sorted(self.owned)}))

    def write_drawn(self, name: str, image: np.ndarray, source: str, warn: Callable[[str], None]) -> str:
        """Writes the BGR ``image`` drawn on ``source`` as ``name`` (JPEG), or as PNG with a warning where a side is
        longer than JPEG allows. Returns the name written.

        Raises:
            FolderError: the image cannot be encoded or written (the message names the file and the reason).
        """
        height, width = image.shape[:2]
        if max(height, width) > JPEG_MAX_SIDE:
            png = os.path.splitext(name)[0] + ".png"
            self.claim([png])
            warn(
                f"the drawn image of {source} is {width}x{height} pixels, beyond JPEG's {JPEG_MAX_SIDE}: written as "
                f"{os.path.join(self.path, png)} instead of {name}"
            )
            name = png
        target = os.path.join(self.path, name)
        try:
            ok, encoded = cv2.imencode(os.path.splitext(name)[1], image)
        except cv2.error as exc:
            ok, reason = False, str(exc).strip().splitlines()[-1]
        else:
            reason = "OpenCV could not encode it"
        if not ok:
            raise FolderError(f"cannot write the drawn image {target} ({width}x{height} pixels): {reason}")
        try:
            atomic_write(target, lambda f: f.write(encoded.tobytes()))
        except OSError as exc:
            raise FolderError(f"cannot write the drawn image {target}: {exc.strerror or exc}") from exc
        return name


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
    ``height``, ``width``; ids as :func:`image_ids` gives them) and, with ``draw``, ``out_dir/<stem>.jpg``: the
    image ``draw`` returns for those same detections (``tools/infer.py`` passes
    :func:`deformable.viz.detections.draw_detections`). A video gives ``out_dir/<stem>.json`` (its frame rate, size
    and, for every ``video_stride``-th frame, the index, time and detections) and, with ``draw``, ``<stem>.mp4``: those
    frames drawn, at the frame rate divided by ``video_stride`` (a video's ``category_id`` is the checkpoint's label,
    with its ``name``).

    Before any work: with ``draw``, an ``out_dir`` that holds an input is refused; an existing file of ``out_dir``
    that no earlier run wrote is never replaced (:class:`OutputFolder`). An image or video that cannot be read is
    skipped: ``warn`` (by default :func:`warnings.warn`) is called with a message naming it and the run goes on.
    ``batch_size`` > 1 pads the smaller images of a batch, which may change their detections slightly.

    Raises:
        ValueError: a batch size or stride < 1 or a threshold outside [0, 1]. FolderError: ``out_dir`` cannot be
        used, or a drawn image or video cannot be written (naming the file). ImageError: no input could be read.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if video_stride < 1:
        raise ValueError(f"video stride must be >= 1, got {video_stride}")
    check_threshold(score_threshold, "score_threshold")
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    paths = _distinct(paths)
    if draw is not None:
        check_out_dir_holds_no_input(paths, out_dir)
    model, state = load_detector(cfg, checkpoint, device)  # a checkpoint that does not fit: nothing written yet
    videos = [path for path in paths if is_video(path)]
    stills = [path for path in paths if not is_video(path)]
    folder = OutputFolder(out_dir)
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
    drawn = [files[path] for path in stills] + [stems[path] + ".mp4" for path in videos] if draw is not None else []
    per_input = [*drawn, *(stems[path] + ".json" for path in videos)]
    folder.claim([RESULTS, IMAGES, *per_input])
    postprocessor = build_postprocessor(cfg)
    names = class_names(cfg, state)
    categories, notes = result_category_ids(dataset_names, names) if known else ({}, [])
    for note in notes:
        warn(note)
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

    bar = tqdm(total=len(stills), desc="infer", unit="img", disable=not show_progress or not stills, dynamic_ncols=True)
    for batch in _readable_batches(stills, batch_size, skip, bar):
        for (path, picture), kept in zip(batch, detect_kept([picture for _, picture in batch]), strict=True):
            if draw is not None:
                folder.write_drawn(files[path], draw(picture, kept, names), path, warn)
            results += [
                {**entry, "category_id": categories.get(entry["category_id"], entry["category_id"])}
                for entry in to_coco_results(ids[path], kept)
            ]
            images.append({"id": ids[path], "file_name": path, "height": picture.shape[0], "width": picture.shape[1]})
    bar.close()
    draw_frame = None if draw is None else (lambda picture, kept: draw(picture, kept, names))
    for path in videos:
        try:
            options = dict(batch_size=batch_size, stride=video_stride, names=names, warn=warn, progress=show_progress)
            _detect_video(path, folder, stems[path], draw_frame, detect_kept, **options)
        except ImageError as exc:
            skip(path, str(exc))
    if paths and len(skipped) == len(paths):
        folder.release_unwritten([RESULTS, IMAGES, *per_input])
        first = next(iter(skipped.values()))
        raise ImageError(f"none of the {len(paths)} inputs could be read ({first}); nothing was written")
    atomic_write_text(os.path.join(out_dir, RESULTS), json.dumps(results))
    atomic_write_text(os.path.join(out_dir, IMAGES), json.dumps(images))
    folder.release_unwritten(per_input)  # a skipped input's, a drawn image written as PNG instead of JPEG
    return InferenceRun(results, images, skipped, [path for path in videos if path not in skipped])


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

    if draw_frame is None:
        run(None)
    else:
        target = os.path.join(folder.path, stem + ".mp4")
        try:
            atomic_save(target, lambda staged: _write_video(staged, info, (info.fps or DEFAULT_FPS) / stride, run))
        except _NoVideoWriter as exc:
            warn(f"cannot write the drawn video {target}: {exc}; its detections are in {stem}.json")
            run(None)
    summary = {"video": path, "fps": info.fps, "width": info.width, "height": info.height, "stride": stride}
    atomic_write_text(os.path.join(folder.path, stem + ".json"), json.dumps({**summary, "frames": frames}))


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
