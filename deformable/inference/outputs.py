"""The output folder of ``tools/infer.py``: the names of what a run writes there, and which existing files a run may
replace or remove (only those an earlier run wrote, by the folder's :data:`MANIFEST`), so that nothing a user saved
is lost and a rerun leaves exactly its own outputs."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence

import cv2
import numpy as np

from models.files import (
    FileTargetError,
    FolderError,
    atomic_save,
    atomic_write,
    atomic_write_text,
    make_dir,
    remove_stale_temp_files,
)

from .video import is_video

RESULTS, IMAGES = "results.json", "images.json"
# The files of the output folder that runs wrote, so that a later run may replace or remove them and nothing else.
# Hidden, as tool metadata is; a run killed midway has already written it, so rerunning into the same folder works.
MANIFEST = ".infer-outputs.json"
JPEG_MAX_SIDE = 65500  # libjpeg's limit; a drawn image with a longer side is written as PNG


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
    """Refuses an output folder that holds one of the inputs (through a link too): drawn images and videos written
    there would sit among the user's files and could replace one of them.

    Raises:
        FolderError: naming the input file (an image or a video) and suggesting another folder.
    """
    if not os.path.isdir(out_dir):
        return  # a folder still to be made holds nothing
    for path in paths:
        folders = {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}
        if any(os.path.samefile(folder, out_dir) for folder in folders if os.path.isdir(folder)):
            norm = os.path.normpath(out_dir)
            other = "detections" if os.path.basename(norm) in (".", "..", "") else f"{norm}_detections"
            kind = "video" if is_video(path) else "image"
            raise FolderError(
                f"the output folder {out_dir} holds the input {kind} {path}: the drawn {kind}s would be written among "
                f"your {kind}s and could replace them; choose another output folder (e.g. --out {other})"
            )


def _plain_name(name: object) -> bool:
    """Whether ``name`` (an entry of a manifest, which anyone may have edited) is a file name directly in the folder:
    an absolute path, a ``..`` or any folder part could point outside it or into a folder of the user's."""
    if not isinstance(name, str) or name in ("", ".", "..", MANIFEST) or "\0" in name:
        return False
    separators = {os.sep, os.altsep} - {None}
    return not any(sep in name for sep in separators) and not os.path.isabs(name) and not os.path.splitdrive(name)[0]


def write_image(path: str, image: np.ndarray, what: str = "") -> None:
    """Writes the BGR ``(H, W, 3)`` uint8 ``image`` to ``path`` in the format of its extension (``.jpg``, ``.png``,
    ...), atomically (:func:`models.files.atomic_write`: an interrupted write leaves the earlier file or none), creating
    its folder. Every image this project draws is written here (infer's drawings, visualize's figures).

    Raises:
        OSError: ``cannot write <what><path> (WxH pixels): <why>``: the image cannot be encoded (no writer for the
            extension, a side too long for the format) or written; a path that cannot be a file is a
            :class:`~models.files.FileTargetError` naming it.
    """
    height, width = image.shape[:2]
    where = f"{what}{path} ({width}x{height} pixels)"
    try:
        ok, encoded = cv2.imencode(os.path.splitext(path)[1], image)
    except cv2.error as exc:  # an extension OpenCV has no writer for
        ok, reason = False, f"{exc.err} (use .png or .jpg)"
    else:
        reason = "OpenCV could not encode it"
    if not ok:
        raise OSError(f"cannot write {where}: {reason}")
    try:
        atomic_write(path, lambda f: f.write(encoded.tobytes()))
    except FileTargetError:
        raise  # names the path and why it cannot be a file
    except OSError as exc:
        raise OSError(f"cannot write {where}: {exc.strerror or exc}") from exc


class OutputFolder:
    """The output folder of a run: a file may be written there when it does not exist yet or when an earlier run
    wrote it (the names in :data:`MANIFEST`); any other existing file is refused, never replaced.

    A run claims its names before any work (:meth:`claim`, recorded at once, so that a run killed midway leaves them
    listed), writes through :meth:`write_drawn`, :meth:`write_text` and :meth:`save`, and ends with :meth:`finish`
    when it succeeds (what earlier runs wrote and this one did not is removed: the manifest lists exactly this run's
    files) or :meth:`abandon` when it fails (nothing removed: the manifest lists what is there of every run's).
    """

    def __init__(self, path: str) -> None:
        make_dir(path, "the output folder")
        remove_stale_temp_files(path)  # what a killed run was writing (a drawn video, beside its place)
        self.path = path
        self.written: set[str] = set()
        # listed: in the manifest, so this tool's to replace or remove; owned: may be replaced (also a folder's
        # outputs from before the manifest existed, which are never removed: their names are only inferred).
        self.listed = self._ours(self._manifest())
        inferred = self._outputs_before_the_manifest() if self._lacks_manifest() else []
        self.owned = self.listed | self._ours(inferred)

    def _lacks_manifest(self) -> bool:
        return not os.path.lexists(os.path.join(self.path, MANIFEST))

    def _manifest(self) -> list:
        try:
            with open(os.path.join(self.path, MANIFEST), encoding="utf-8") as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # missing or unreadable: nothing in the folder is known to be ours
        return files if isinstance(files, list) else []

    def _outputs_before_the_manifest(self) -> list[str]:
        """A folder that a version without the manifest wrote: its images.json lists the inputs, whose drawn names
        :func:`output_names` gives (the same naming, in the same order)."""
        try:
            with open(os.path.join(self.path, IMAGES), encoding="utf-8") as f:
                files = [entry["file_name"] for entry in json.load(f)]
        except (OSError, ValueError, KeyError, TypeError):
            return []  # missing or not infer's images.json
        if not all(isinstance(name, str) for name in files):
            return []
        return [RESULTS, IMAGES, *output_names(files).values()]

    def _ours(self, names: Iterable[object]) -> set[str]:
        """Those of ``names`` that are plain files of the folder: a name whose file is gone (claimed by a run killed
        before writing it) or is now a folder or a link (the user's) is not this tool's any more."""
        return {name for name in names if _plain_name(name) and self._is_file(name)}

    def _is_file(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(os.path.join(self.path, name)).st_mode)
        except OSError:
            return False

    def _record(self, listed: set[str]) -> None:
        self.listed = listed
        atomic_write_text(os.path.join(self.path, MANIFEST), json.dumps({"files": sorted(listed)}))

    def claim(self, names: Iterable[str]) -> None:
        """Checks that every one of ``names`` may be written, then records them as this tool's (before they are
        written, so that a run killed midway leaves a folder that the next run may write into).

        Raises:
            FolderError: some of ``names`` exist and no earlier run wrote them (the message names them).
        """
        names = set(names)
        foreign = sorted(n for n in names if n not in self.owned and os.path.lexists(os.path.join(self.path, n)))
        if foreign:
            shown = ", ".join(os.path.join(self.path, n) for n in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise FolderError(
                f"the output folder {self.path} already holds {shown}{more}, which no earlier run of infer wrote: "
                "infer never replaces such a file; move it away or choose another output folder (--out)"
            )
        self.owned |= names
        if not names <= self.listed:
            self._record(self.listed | names)

    def abandon(self) -> None:
        """After a failed run: forgets the names claimed but not written, so that the manifest lists the files of
        this run and of earlier ones that are there; nothing is removed."""
        there = self._ours(self.listed)
        if there != self.listed:
            self._record(there)

    def finish(self, inputs: Iterable[str], warn: Callable[[str], None]) -> list[str]:
        """After a run that succeeded: removes the files the manifest lists that this run did not write (an earlier
        run's outputs, for inputs not given again or drawn under other names), never one of ``inputs``, and lists
        this run's files. A file that cannot be removed is said through ``warn`` and stays listed.

        Returns:
            The names removed.
        """
        stale = sorted(self.listed - self.written)
        in_use = {_identity(path) for path in inputs} - {None} if stale else set()
        removed, kept = [], set()
        for name in stale:
            target = os.path.join(self.path, name)
            if not self._is_file(name):
                continue  # gone, or a folder or link of the user's now
            if _identity(target) in in_use:
                kept.add(name)  # an earlier drawing given as an input: still this tool's, and in use
                continue
            try:
                os.unlink(target)
            except FileNotFoundError:
                continue
            except OSError as exc:
                warn(f"cannot remove {target}, which an earlier run of infer wrote: {exc.strerror or exc}")
                kept.add(name)
                continue
            removed.append(name)
        self._record(self._ours(self.written) | kept)
        return removed

    def write_text(self, name: str, text: str) -> None:
        """Writes ``text`` (UTF-8) as ``name``, a claimed name, atomically."""
        atomic_write_text(os.path.join(self.path, name), text)
        self.written.add(name)

    def save(self, name: str, save: Callable[[str], None]) -> None:
        """Writes ``name``, a claimed name, atomically with ``save(staged path)`` (a writer that takes a path)."""
        atomic_save(os.path.join(self.path, name), save)
        self.written.add(name)

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
            write_image(target, image, what="the drawn image ")
        except OSError as exc:
            raise FolderError(str(exc)) from exc
        self.written.add(name)
        return name


def _identity(path: str) -> tuple[int, int] | None:
    """The file ``path`` is (through links, and a hard link's other names alike); None when there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino
