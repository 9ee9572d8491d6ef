"""One writer per run folder: a training run holds a lock on its ``output_dir`` while it writes there, so that a second
run started on the same folder (the same command in another terminal, ``train.resume=auto`` while the first still
runs, workers that outlived a killed ``torchrun``) is refused instead of interleaving its checkpoints and log lines
with the first one's.

The lock is a POSIX record lock (``fcntl.lockf``) on ``output_dir/.run.lock``, which says which process holds it. The
system releases it when that process ends, however it ends (``kill -9`` included), so a killed run leaves no stale
lock; forked data-loading workers do not inherit it. The file is removed when the run ends. Where the platform or the
file system has no such locks (Windows; some network file systems), nothing is locked.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from models.files import FolderError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".run.lock"
_HELD = (errno.EACCES, errno.EAGAIN)  # what lockf raises when another process holds the lock


@contextmanager
def run_lock(folder: str, setting: str = "output_dir") -> Iterator[None]:
    """Holds the lock of ``folder`` (an existing folder) while the context runs.

    Raises:
        FolderError: another process holds it; the message names that process and ``setting``.
    """
    fd = _acquire(folder, setting)
    try:
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(os.path.join(folder, LOCK_NAME))  # while still held: a waiting process retries (_acquire)
            except OSError:
                pass
            os.close(fd)


def _acquire(folder: str, setting: str) -> int | None:
    """The descriptor of the locked file, or None where nothing can be locked."""
    if fcntl is None:
        return None
    path = os.path.join(folder, LOCK_NAME)
    for _ in range(10):  # the file may be removed between opening and locking it: lock the one at the path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # cannot create it (permissions): writing the checkpoint will say so
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() if exc.errno in _HELD else ""
            os.close(fd)
            if exc.errno not in _HELD:
                return None  # no locks on this file system
            raise FolderError(
                f"{setting} {folder} is in use by another training run ({holder or 'another process'}, which holds "
                f"{path}): wait for it to end or stop it, or choose another {setting}"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)  # removed by the run that held it, as it ended: try the path again
    return None
