"""Training curves from ``log.jsonl`` (one JSON object per epoch, written by :mod:`deformable.training.engine`):
the loss terms, the learning rate and the COCO AP metrics against the epoch, as line charts drawn with OpenCV."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from . import draw

Series = dict[str, tuple[list[float], list[float]]]  # name -> (epochs, values)
AUX = re.compile(r"_\d+$")  # auxiliary decoder-layer losses (loss_ce_0 ...): left out, they crowd the chart
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def chart_groups(records: Sequence[Mapping]) -> list[tuple[str, Series, bool]]:
    """The charts to draw as ``(title, series, log_y)``: losses (main terms, no auxiliary ones), learning rate (log
    scale), AP metrics (when evaluated)."""
    keys = sorted({k for r in records for k in r})
    losses = [k for k in keys if "loss" in k and not AUX.search(k)]
    losses.sort(key=lambda k: (k not in ("loss", "train_loss"), k))  # the total first
    groups = [
        ("losses", series(records, losses), False),
        ("learning rate", series(records, ["lr"], floor=0.0), True),
        ("COCO AP", series(records, [k for k in AP_KEYS if k in keys], floor=-1.0), False),
    ]
    return [group for group in groups if group[1]]


def plot_curves(records: Sequence[Mapping], panel_size: tuple[int, int] = (520, 340)) -> np.ndarray:
    """One line chart per group of :func:`chart_groups`, side by side. Returns a BGR image."""
    groups = chart_groups(records)
    if not groups:
        raise LogError("the log has no loss, lr or AP values to plot")
    charts = [line_chart(title, s, panel_size, log_y) for title, s, log_y in groups]
    return draw.tile(charts, columns=len(groups))


def _ticks(low: float, high: float, count: int = 5) -> np.ndarray:
    """About ``count`` round tick values covering ``[low, high]``."""
    if high <= low:
        low, high = low - 0.5 * (abs(low) or 1.0), high + 0.5 * (abs(high) or 1.0)
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    return np.arange(math.floor(low / step), math.ceil(high / step) + 1) * step


def _log_ticks(low: float, high: float, most: int = 8) -> np.ndarray:
    """Tick positions on a log10 axis covering ``[low, high]`` (log10 values) at 1, 2 and 5 times a power of ten
    (only the powers when that gives more than ``most``), so that each label, printed with one digit, is the value
    its line stands at."""
    first, last = math.floor(low) - 1, math.ceil(high) + 1
    marks = [e + math.log10(m) for e in range(first, last + 1) for m in (1, 2, 5)]
    if 3 * (high - low) + 1 > most:  # three 1-2-5 marks per power of ten: too many, so the powers only
        marks = [float(e) for e in range(first, last + 1)]
    eps = 1e-9
    below = max(t for t in marks if t <= low + eps)
    above = min(t for t in marks if t >= high - eps)
    if above - below < eps:  # one value: a mark either side
        below, above = max(t for t in marks if t < below - eps), min(t for t in marks if t > above + eps)
    return np.array([t for t in marks if below - eps <= t <= above + eps])


def line_chart(title: str, data: Series, size: tuple[int, int] = (520, 340), log_y: bool = False) -> np.ndarray:
    """A white ``size = (width, height)`` chart of ``data`` against the epoch with axes, ticks and a legend
    (``log_y``: positive values on a log10 axis)."""
    if log_y:
        data = {k: (xv, [math.log10(y) for y in yv]) for k, (xv, yv) in data.items()}
    width, height = size
    left, right, top, bottom = 64, 12, 28, 36
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    xs = [x for xv, _ in data.values() for x in xv]
    ys = [y for _, yv in data.values() for y in yv]
    x_ticks = _ticks(min(xs), max(xs))
    y_ticks = _log_ticks(min(ys), max(ys)) if log_y else _ticks(min(ys), max(ys))
    x_ticks = x_ticks[x_ticks == np.round(x_ticks)]  # epochs are integers
    x_lo, x_hi = min(x_ticks[0], min(xs)), max(x_ticks[-1], max(xs))
    y_lo, y_hi = y_ticks[0], y_ticks[-1]

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_lo) / max(x_hi - x_lo, 1e-12) * (width - left - right)
        return px, top + (y_hi - y) / max(y_hi - y_lo, 1e-12) * (height - top - bottom)

    _axes(canvas, title, x_ticks, y_ticks, to_px, (left, top, width - right, height - bottom), log_y)
    for i, (xv, yv) in enumerate(data.values()):
        points = np.array([to_px(x, y) for x, y in zip(xv, yv, strict=True)])
        fixed = np.round(points * (1 << draw.SHIFT)).astype(np.int32)
        cv2.polylines(canvas, [fixed], False, draw.colour(i), 2, cv2.LINE_AA, draw.SHIFT)
        if len(points) <= 30:
            for x, y in points:
                cv2.circle(canvas, draw.fixed_point(x, y), 3 << draw.SHIFT, draw.colour(i), -1, cv2.LINE_AA, draw.SHIFT)
    entries = [(draw.colour(i), name) for i, name in enumerate(data)]
    key = draw.stack([draw.legend([entry], 150, scale=0.4) for entry in entries])  # one entry per line
    canvas[top + 1 : top + 1 + key.shape[0], width - right - 151 : width - right - 1] = key
    return canvas


def _axes(canvas: np.ndarray, title: str, x_ticks, y_ticks, to_px, box: tuple[int, int, int, int], log_y: bool) -> None:
    """Frame, grid lines, tick labels and title."""
    x0, y0, x1, y1 = box
    grey = (220, 220, 220)
    for y in y_ticks:
        py = round(to_px(x_ticks[0], y)[1])
        cv2.line(canvas, (x0, py), (x1, py), grey, 1)
        text = f"{10.0**y:.0e}" if log_y else f"{y:.3g}"
        cv2.putText(canvas, text, (4, py + 4), draw.FONT, 0.38, draw.BLACK, 1, cv2.LINE_AA)
    for x in x_ticks:
        px = round(to_px(x, y_ticks[0])[0])
        cv2.line(canvas, (px, y1), (px, y1 + 4), draw.BLACK, 1)
        cv2.putText(canvas, f"{x:g}", (px - 6, y1 + 18), draw.FONT, 0.38, draw.BLACK, 1, cv2.LINE_AA)
    cv2.rectangle(canvas, (x0, y0), (x1, y1), draw.BLACK, 1)
    cv2.putText(canvas, f"{title} (x: epoch)", (x0, y0 - 9), draw.FONT, 0.5, draw.BLACK, 1, cv2.LINE_AA)
