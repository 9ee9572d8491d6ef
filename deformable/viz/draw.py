"""OpenCV drawing primitives on BGR uint8 canvases, sub-pixel exact (``cv2`` fixed-point ``shift``).

Coordinates given to these functions are canvas pixel-centre coordinates (pixel i has centre i), as
:func:`deformable.viz.coords.image_to_canvas` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from deformable.inference.outputs import write_image

Colour = tuple[int, int, int]  # BGR

# Tableau 10 (BGR): distinct under most colour-vision deficiencies and on light or dark images.
PALETTE: tuple[Colour, ...] = (
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
    (34, 189, 188),
    (207, 190, 23),
)
SHIFT = 4  # cv2 fixed-point bits: coordinates are multiplied by 16
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, WHITE = (0, 0, 0), (255, 255, 255)


def colour(index: int) -> Colour:
    return PALETTE[index % len(PALETTE)]


def fixed_point(x: float, y: float) -> tuple[int, int]:
    return round(x * (1 << SHIFT)), round(y * (1 << SHIFT))


def draw_points(
    canvas: np.ndarray,
    xy: np.ndarray,
    colours: Sequence[Colour],
    strengths: np.ndarray,
    max_radius: float = 6.0,
    min_radius: float = 1.5,
    min_opacity: float = 0.35,
) -> None:
    """Filled discs whose area and opacity grow with ``strengths`` (in [0, 1]; 1 = opaque, ``max_radius``).

    Args:
        canvas: ``(H, W, 3)`` uint8, drawn on in place.
        xy: ``(K, 2)`` pixel-centre coordinates. colours: K BGR colours. strengths: ``(K,)``.
    """
    strengths = np.clip(np.asarray(strengths, dtype=np.float64), 0.0, 1.0)
    for k in np.argsort(strengths, kind="stable"):  # strongest on top
        x, y = float(xy[k, 0]), float(xy[k, 1])
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        radius = min_radius + (max_radius - min_radius) * float(np.sqrt(strengths[k]))
        opacity = min_opacity + (1.0 - min_opacity) * float(strengths[k])
        _blend_disc(canvas, x, y, radius, colours[k], opacity)


def _blend_disc(canvas: np.ndarray, x: float, y: float, radius: float, bgr: Colour, opacity: float) -> None:
    """Alpha-blends one disc, touching only its bounding box."""
    height, width = canvas.shape[:2]
    pad = int(np.ceil(radius)) + 2
    x0, y0 = max(int(np.floor(x)) - pad, 0), max(int(np.floor(y)) - pad, 0)
    x1, y1 = min(int(np.floor(x)) + pad + 1, width), min(int(np.floor(y)) + pad + 1, height)
    if x0 >= x1 or y0 >= y1:
        return
    roi = canvas[y0:y1, x0:x1]
    layer = roi.copy()
    centre, r = fixed_point(x - x0, y - y0), round(radius * (1 << SHIFT))
    cv2.circle(layer, centre, r, bgr, -1, cv2.LINE_AA, SHIFT)
    cv2.addWeighted(layer, opacity, roi, 1.0 - opacity, 0.0, dst=roi)


def draw_cross(
    canvas: np.ndarray, x: float, y: float, bgr: Colour = WHITE, size: float = 7.0, thickness: int = 2
) -> None:
    """An ``x``-shaped cross centred on ``(x, y)`` with a dark outline, so it shows on any background."""
    for c, t in ((BLACK, thickness + 2), (bgr, thickness)):
        for dx, dy in ((size, size), (size, -size)):
            cv2.line(canvas, fixed_point(x - dx, y - dy), fixed_point(x + dx, y + dy), c, t, cv2.LINE_AA, SHIFT)


def draw_box(canvas: np.ndarray, xyxy: Sequence[float], bgr: Colour, text: str = "", thickness: int = 2) -> None:
    """A rectangle (dark outline) with corners ``(x0, y0, x1, y1)`` (pixel-centre coordinates) and a label above."""
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    corners = fixed_point(x0, y0), fixed_point(x1, y1)
    cv2.rectangle(canvas, *corners, BLACK, thickness + 2, cv2.LINE_AA, SHIFT)
    cv2.rectangle(canvas, *corners, bgr, thickness, cv2.LINE_AA, SHIFT)
    if text:
        put_label(canvas, text, int(round(x0)), int(round(y0)) - thickness, bgr)


def put_label(canvas: np.ndarray, text: str, x: int, y: int, bgr: Colour, scale: float = 0.45) -> None:
    """Text on a filled background of ``bgr`` with its bottom-left at ``(x, y)``, kept inside the canvas."""
    (tw, th), base = cv2.getTextSize(text, FONT, scale, 1)
    height, width = canvas.shape[:2]
    x = min(max(x, 0), max(width - tw - 4, 0))
    y = min(max(y, th + base + 2), height - 1)
    cv2.rectangle(canvas, (x, y - th - base - 2), (x + tw + 4, y), bgr, -1)
    light = sum(bgr) > 3 * 150
    cv2.putText(canvas, text, (x + 2, y - base), FONT, scale, BLACK if light else WHITE, 1, cv2.LINE_AA)


def legend(entries: Sequence[tuple[Colour | None, str]], width: int, scale: float = 0.45) -> np.ndarray:
    """A white panel ``width`` wide listing ``(colour, text)`` entries (a swatch when the colour is not None),
    wrapped into as many rows as needed."""
    (_, th), base = cv2.getTextSize("Ag", FONT, scale, 1)
    line_h = th + base + 8
    rows: list[list[tuple[Colour | None, str, int]]] = [[]]
    used = 6
    for bgr, text in entries:
        item_w = cv2.getTextSize(text, FONT, scale, 1)[0][0] + (22 if bgr is not None else 0) + 14
        if rows[-1] and used + item_w > width:
            rows.append([])
            used = 6
        rows[-1].append((bgr, text, used))
        used += item_w
    panel = np.full((line_h * len(rows) + 6, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        y = 6 + r * line_h + th
        for bgr, text, x in row:
            if bgr is not None:
                cv2.circle(panel, (x + 7, y - th // 2), 6, bgr, -1, cv2.LINE_AA)
                x += 18
            cv2.putText(panel, text, (x, y), FONT, scale, BLACK, 1, cv2.LINE_AA)
    return panel


def stack(parts: Sequence[np.ndarray], axis: int = 0, fill: int = 255) -> np.ndarray:
    """Concatenates BGR images vertically (axis 0) or horizontally (axis 1), padding the other side with ``fill``."""
    other = 1 - axis
    size = max(p.shape[other] for p in parts)
    padded = []
    for p in parts:
        missing = size - p.shape[other]
        pad = ((0, 0), (0, missing), (0, 0)) if axis == 0 else ((0, missing), (0, 0), (0, 0))
        padded.append(np.pad(p, pad, constant_values=fill))
    return np.concatenate(padded, axis=axis)


def tile(panels: Sequence[np.ndarray], columns: int, gap: int = 8) -> np.ndarray:
    """Panels in a grid of ``columns`` (row-major), separated by ``gap`` white pixels."""
    rows = []
    for start in range(0, len(panels), columns):
        row: list[np.ndarray] = []
        for p in panels[start : start + columns]:
            if row:
                row.append(np.full((p.shape[0], gap, 3), 255, dtype=np.uint8))
            row.append(p)
        rows.append(stack(row, axis=1))
    with_gaps: list[np.ndarray] = []
    for r in rows:
        if with_gaps:
            with_gaps.append(np.full((gap, r.shape[1], 3), 255, dtype=np.uint8))
        with_gaps.append(r)
    return stack(with_gaps, axis=0)


def save_image(path: str, image: np.ndarray) -> None:
    """Writes a BGR ``(H, W, 3)`` uint8 image to ``path`` (format from the extension), creating its folder, atomically
    (:func:`deformable.inference.outputs.write_image`).

    Raises:
        OSError: naming the path when it cannot be written (no such format, a folder that cannot be made or written).
    """
    write_image(path, image)
