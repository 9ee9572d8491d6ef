"""Writing files so that nothing a user saved is ever lost: a write goes to a temporary file beside the target, is
flushed and fsynced, and then replaces the target with ``os.replace``. A process killed at any moment leaves either
the previous file or the new one, never a torn one. Every file this project writes (checkpoints, configs, converted
weights, logs' summaries) goes through :func:`atomic_write`, with the permissions an ordinary write would give it;
the folders a user names are made by :func:`make_dir`, which names the setting when one cannot be used.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

TMP_PREFIX = ".tmp-"


class FolderError(ValueError):
    """A folder the user named (``output_dir``, ``--out``) that cannot be used: the message names the setting."""


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


def fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX only; elsewhere a no-op)."""
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it and renames it onto ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX + os.path.basename(path) + ".")
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp's file is private (0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` as UTF-8 to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Deletes the temporary files that a killed writer left in ``directory``."""
    for path in glob.glob(os.path.join(os.fspath(directory), TMP_PREFIX + "*")):
        os.unlink(path)
