"""The one error type of the data package, and the message of an error a DataLoader worker raised."""

from __future__ import annotations

import re


class DatasetError(RuntimeError):
    """Missing or malformed data; the message names the file (and the line where it applies) and how to fix it."""


# How torch re-raises an error of a DataLoader worker process (torch._utils.ExceptionWrapper.reraise): an exception
# (of the same type where it can) whose message is this header, then the worker's formatted traceback.
_WORKER_HEADER = re.compile(r"\ACaught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback \(most recent")


def error_message(exc: BaseException) -> str:
    """``exc``'s message as a tool prints it: for an error that torch re-raised from a DataLoader worker (its message
    is "Caught DatasetError in DataLoader worker process N. Original Traceback ..." and the worker's traceback), the
    worker's own message, what follows the traceback's last ``<module>.<Type>: ``; else ``str(exc)``."""
    text = str(exc)
    header = _WORKER_HEADER.match(text)
    if header is None:
        return text
    # traceback.format_exception names the type by module and qualified name (a built-in one by its name alone)
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{header.group(1)}: ", text, flags=re.MULTILINE))
    return text[found[-1].end() :].strip() if found else text
