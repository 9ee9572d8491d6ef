"""Writing files so that nothing a user saved is ever lost: a write goes to a temporary file beside the target, is
flushed and fsynced, and then replaces the target with ``os.replace``. A process killed at any moment leaves either
the previous file or the new one, never a torn one. Every file this project writes (checkpoints, configs, converted
weights, logs' summaries) goes through :func:`atomic_write`, with the permissions an ordinary write would give it;
the folders a user names are made by :func:`make_dir`, which names the setting when one cannot be used.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import BinaryIO

TMP_PREFIX = ".tmp-"
# Bytes of the target's name kept in a temporary name: with the prefix, the dot and mkstemp's 8 random characters it
# stays within the 255 bytes a file name may have, however long the target's name.
TMP_NAME_BYTES = 200


def temp_prefix(path: str | os.PathLike) -> str:
    """The prefix of the temporary file or folder written beside ``path``: :data:`TMP_PREFIX`, ``path``'s name (cut
    to :data:`TMP_NAME_BYTES` bytes, at a character boundary) and a dot."""
    name = os.path.basename(os.fspath(path)).encode("utf-8", "surrogateescape")[:TMP_NAME_BYTES]
    return TMP_PREFIX + name.decode("utf-8", "ignore") + "."


class FolderError(ValueError):
    """A folder the user named (``output_dir``, ``--out``) that cannot be used: the message names the setting."""


class FileTargetError(ValueError, OSError):
    """A file path to write that cannot be one: empty, a folder, under a file, or in a folder that cannot be written;
    the message names the path (and the setting, when one is given). An OSError too: callers that caught what the
    write itself raised before this check (IsADirectoryError, PermissionError...) still catch it."""


def _blocking_ancestor(path: str) -> str | None:
    """The nearest existing ancestor of ``path`` when it is not a folder (a file in the way), else None."""
    parent = _nearest_existing(path)
    return None if os.path.isdir(parent) else parent


def _nearest_existing(path: str) -> str:
    """The nearest existing ancestor of ``path`` (the file system's root for a relative path with none)."""
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent or os.sep


def check_file_target(path: str | os.PathLike, setting: str = "") -> str:
    """Checks that ``path`` can be written as a file (its missing parent folders created), before any long work is
    done for it. Returns its absolute form.

    Raises:
        FileTargetError: ``path`` is empty, ends with a separator (a folder's name), is an existing folder, lies under
            an existing file, or its nearest existing folder is not writable; ``setting`` (e.g. ``--out``) named.
    """
    path = os.fspath(path)
    what = f"{setting} " if setting else ""
    if not path:
        raise FileTargetError(f"{what}is empty: name the file to write")
    if path.endswith((os.sep, "/")) or (os.altsep and path.endswith(os.altsep)):
        raise FileTargetError(f"{what}{path} ends with a path separator, so it names a folder: name the file to write")
    absolute = os.path.abspath(path)
    if os.path.isdir(absolute):
        raise FileTargetError(f"{what}{path} is a folder: name the file to write (e.g. {os.path.join(path, '...')})")
    blocking = _blocking_ancestor(absolute)
    if blocking is not None:
        raise FileTargetError(f"{what}{path} cannot be written: {blocking} is a file, not a folder")
    existing = _nearest_existing(absolute)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileTargetError(f"{what}{path} cannot be written: the folder {existing} is not writable")
    return absolute


def check_folder_target(path: str | os.PathLike, setting: str = "") -> str:
    """Checks that ``path`` can be used as a folder to write into (created with its parents when missing). Returns
    its absolute form.

    Raises:
        FileTargetError: ``path`` is empty, is an existing file, lies under an existing file, or its nearest existing
            folder is not writable; ``setting`` named.
    """
    path = os.fspath(path)
    what = f"{setting} " if setting else ""
    if not path:
        raise FileTargetError(f"{what}is empty: name the folder to write into")
    absolute = os.path.abspath(path)
    if os.path.exists(absolute) and not os.path.isdir(absolute):
        raise FileTargetError(f"{what}{path} is a file, not a folder")
    blocking = _blocking_ancestor(absolute)
    if blocking is not None:
        raise FileTargetError(f"{what}{path} cannot be created: {blocking} is a file, not a folder")
    existing = absolute if os.path.isdir(absolute) else _nearest_existing(absolute)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FileTargetError(f"{what}{path} cannot be written: the folder {existing} is not writable")
    return absolute


def make_dir(path: str | os.PathLike, setting: str) -> None:
    """Creates the folder ``path`` and its parents if missing.

    Raises:
        FolderError: ``path`` is empty, is a file, or cannot be created (permissions, read-only file system), with
            ``setting`` (e.g. ``output_dir``) named.
    """
    path = os.fspath(path)
    if not path:
        raise FolderError(f"{setting} is empty: name the folder to write into")
    if os.path.exists(path) and not os.path.isdir(path):
        raise FolderError(f"{setting} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise FolderError(f"{setting} {path} cannot be created: {exc.strerror or exc}") from exc


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _mode_for(path: str) -> int:
    """The permissions a write to ``path`` keeps: the existing file's, else what ``open()`` would give a new one."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def staging_dir(parent: str, prefix: str) -> str:
    """A new empty folder in ``parent`` (``tempfile.mkdtemp``) to assemble a folder in before it is renamed into
    place, with the permissions ``os.makedirs`` would give it (mkdtemp's are private, 0700, which would keep a model
    folder or data set from other users of the machine)."""
    folder = tempfile.mkdtemp(dir=parent, prefix=prefix)
    os.chmod(folder, 0o777 & ~_UMASK)
    return folder


def fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX only; elsewhere a no-op)."""
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and renames it onto ``path``.

    Raises:
        FileTargetError: ``path`` is no file path (:func:`check_file_target`), checked before anything is written:
            an empty path would otherwise put the temporary file in the parent of the working folder, and a folder
            would fail only at the final rename.
    """
    path = os.fspath(path)
    directory = os.path.dirname(check_file_target(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(path))
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp's file is private (0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise_interrupt(exc)
        raise
    fsync_dir(directory)


def raise_interrupt(exc: BaseException) -> None:
    """Raises KeyboardInterrupt when ``exc`` was raised while one unwound (Ctrl-C inside ``torch.save``, whose zip
    writer then fails to close: ``RuntimeError: unexpected pos``), so that the caller sees the interrupt it handles,
    not the writer's error; returns otherwise."""
    cause = None if isinstance(exc, KeyboardInterrupt) else exc.__context__  # Python keeps context chains acyclic
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        cause = cause.__context__


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> None:
    """Atomic writing for writers that take a path and may write files beside it (ONNX's external ``.data``):
    ``save(tmp)`` writes into a private temporary folder beside ``path`` under ``path``'s own name, so that the files
    it names inside each other keep their names; each file is fsynced and renamed into ``path``'s folder, ``path``
    itself last. A failure leaves no file behind, and an existing ``path`` untouched.

    Raises:
        FileTargetError: ``path`` is no file path (:func:`check_file_target`).
    """
    path = check_file_target(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=directory, prefix=temp_prefix(path))
    try:
        staged = os.path.join(tmp, os.path.basename(path))
        save(staged)
        if not os.path.isfile(staged):
            raise FileNotFoundError(f"the writer of {path} wrote no file")
        names = sorted(os.listdir(tmp), key=lambda name: name == os.path.basename(path))  # path itself last
        for name in names:
            source = os.path.join(tmp, name)
            os.chmod(source, _mode_for(os.path.join(directory, name)))
            with open(source, "rb") as f:
                os.fsync(f.fileno())
            os.replace(source, os.path.join(directory, name))
    except BaseException as exc:
        raise_interrupt(exc)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` as UTF-8 to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Deletes the temporary files and folders (:func:`atomic_save`'s, a transformers folder being written) that a
    killed writer left in ``directory``."""
    for path in glob.glob(os.path.join(os.fspath(directory), TMP_PREFIX + "*")):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
