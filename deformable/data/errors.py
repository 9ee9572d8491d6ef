"""The one error type of the data package."""

from __future__ import annotations


class DatasetError(RuntimeError):
    """Missing or malformed data; the message names the file (and the line where it applies) and how to fix it."""
