"""The one error type of the data package, the reading of text files that raises it for bytes that are not UTF-8,
and the message of an error a DataLoader worker raised."""

from __future__ import annotations

import codecs
import re


class DatasetError(ValueError):
    """Missing or malformed data; the message names the file (and the line where it applies) and how to fix it."""


def read_text(path: str) -> str:
    """The text of the UTF-8 file ``path``, without the byte order mark Windows tools write at its start.

    Raises:
        DatasetError: a byte that is not UTF-8 (a file saved as Latin-1 or Windows-1252), naming the file, the byte
            and its position and line (a decoder's own error names neither the file nor the line).
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        raw = f.read()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        position = start + exc.start
        line = raw[:position].count(b"\n") + 1
        raise DatasetError(
            f"{path} is not UTF-8 text: byte 0x{raw[position]:02x} at position {position} (line {line}) cannot be "
            f"decoded ({exc.reason}); save the file as UTF-8"
        ) from exc


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
