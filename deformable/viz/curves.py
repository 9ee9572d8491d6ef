"""Training curves from ``log.jsonl`` (one JSON object per epoch, written by :mod:`deformable.training.engine`):
the loss terms, the learning rate and the COCO AP metrics against the epoch, as matplotlib line charts."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deformable.data.coco_eval import AP_NAMES
from models.files import atomic_write, make_dir

Series = dict[str, tuple[list[float], list[float]]]  # name -> (epochs, values)
AUX = re.compile(r"_\d+$")  # auxiliary decoder-layer losses (loss_ce_0 ...): left out, they crowd the chart


class LogError(ValueError):
    """A ``log.jsonl`` that cannot be read; the message names the file (and line)."""


def read_log(path: str) -> list[dict]:
    """The records of ``path``, in file order; blank lines are skipped, and so is an unfinished last line (a run
    killed, or still writing, mid-line), with a warning."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as exc:
        raise LogError(f"cannot read log {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:  # an image or other binary file given as the log
        raise LogError(
            f"{path} is not a log.jsonl: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from exc
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                warnings.warn(
                    f"{path}: line {number} is unfinished (a run killed or still writing); skipped it", stacklevel=2
                )
                continue
            raise LogError(f"{path} line {number} is not JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or "epoch" not in record:
            raise LogError(f"{path} line {number} is not an object with an 'epoch' key")
        if not _number(record["epoch"]):
            raise LogError(f"{path} line {number}: its epoch {record['epoch']!r} is not a number")
        records.append(record)
    if not records:
        raise LogError(f"{path} holds no records")
    return records


def series(records: Sequence[Mapping], keys: Sequence[str], floor: float = -math.inf) -> Series:
    """``keys`` -> (epochs, values) over the records that have a finite number above ``floor`` for them (COCO
    writes -1 for a metric without ground truth); absent keys omitted."""
    out: Series = {}
    for key in keys:
        points = [(float(r["epoch"]), float(r[key])) for r in records if _number(r.get(key)) and r[key] > floor]
        if points:
            out[key] = ([p[0] for p in points], [p[1] for p in points])
    return out


def _number(value: object) -> bool:
    """A finite int or float (not a bool; an int too large for a float is none)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def chart_groups(records: Sequence[Mapping]) -> list[tuple[str, Series, bool]]:
    """The charts to draw as ``(title, series, log_y)``: losses (main terms, no auxiliary ones), learning rate (log
    scale), AP metrics (when evaluated)."""
    keys = sorted({k for r in records for k in r})
    losses = [k for k in keys if "loss" in k and not AUX.search(k)]
    losses.sort(key=lambda k: (k not in ("loss", "train_loss"), k))  # the total first
    groups = [
        ("losses", series(records, losses), False),
        ("learning rate", series(records, ["lr"], floor=0.0), True),
        ("COCO AP", series(records, [k for k in AP_NAMES if k in keys], floor=-1.0), False),
    ]
    return [group for group in groups if group[1]]


def plot_curves(
    records: Sequence[Mapping], panel_size: tuple[float, float] = (5.2, 3.4), dpi: int = 100, source: str = "the log"
) -> Figure:
    """One line chart per group of :func:`chart_groups`, side by side, each ``panel_size = (width, height)`` inches.
    Returns a matplotlib figure (not attached to pyplot: nothing global is touched) for :func:`save_figure`.

    Raises:
        LogError: the records hold no value to plot; ``source`` (the log file) names them in the message.
    """
    groups = chart_groups(records)
    if not groups:
        raise LogError(f"{source} has no loss, lr or AP values to plot")
    width, height = panel_size
    figure = Figure(figsize=(width * len(groups), height), dpi=dpi, layout="constrained")
    for axes, (title, data, log_y) in zip(figure.subplots(1, len(groups), squeeze=False)[0], groups, strict=True):
        for name, (epochs, values) in data.items():
            axes.plot(epochs, values, marker="o" if len(epochs) <= 30 else None, markersize=3, label=name)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        epochs = {x for xs, _ in data.values() for x in xs}
        if len(epochs) == 1:  # one epoch: its tick alone (the locator would spread fractions around it)
            axes.set_xticks(sorted(epochs))
        if log_y:
            axes.set_yscale("log")
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def figure_formats() -> list[str]:
    """The file extensions :func:`save_figure` writes (matplotlib's: png, pdf, svg, jpg, ...; not pgf, which needs a
    LaTeX installation)."""
    return sorted(set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf"})


def check_figure_path(path: str) -> str:
    """The format (extension without the dot, lower case) of ``path``.

    Raises:
        LogError: ``path`` has no extension matplotlib writes, naming the ones it does.
    """
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    if extension not in figure_formats():
        raise LogError(f"--out {path!r} has no extension matplotlib writes; use one of {', '.join(figure_formats())}")
    return extension


def save_figure(path: str, figure: Figure) -> None:
    """Writes ``figure`` to ``path`` (format from the extension) atomically, creating its folder.

    Raises:
        LogError: an extension matplotlib does not write (:func:`check_figure_path`).
        OSError: naming the path when it cannot be written (a folder, no permission).
    """
    extension = check_figure_path(path)
    make_dir(os.path.dirname(os.path.abspath(path)), "the figure's folder")
    FigureCanvasAgg(figure)  # the figure draws on Agg, whatever backend pyplot may use elsewhere
    try:
        atomic_write(path, lambda f: figure.savefig(f, format=extension))
    except OSError as exc:  # named by the path asked for, not the temporary file beside it
        raise OSError(f"could not write {path}: {exc.strerror or exc}") from exc
