"""Draws docs/cope_gates.png: a row of gates and where contextual offsets land, from a model trained on the
counting task of ``tools/experiments/cope_counting.py`` (the default 1500 steps, about a minute on a CPU).

Two panels, a row with the trained marker gaps and a row with wider, unseen gaps, each showing top to bottom: the
image row (markers coloured by class, the reference pixel crossed) with head 0's sampling points for the queries
k = 1, 2, 3 (filled dots; open circles where the same offsets would land as pixel offsets); the count density of
head 0 along the row (its gates, scaled so that a half-open gate is 1); the cumulative count with the offsets ``u``
as ticks at the reference and lines to where each lands.

    python tools/experiments/cope_figure.py --out docs/cope_gates.png
"""

from __future__ import annotations

import argparse
import os
import warnings

import cv2
import numpy as np
import torch
from cope_counting import Task, make_batch, train  # beside this file: the script's folder is on sys.path

CELL, MARGIN = 14, 50
K_COLOURS = [(40, 40, 220), (30, 160, 30), (200, 90, 20)]  # BGR for k = 1, 2, 3


def class_colour(c: int) -> tuple[int, int, int]:
    hue = int(180 * (c - 1) / 8)
    bgr = cv2.cvtColor(np.uint8([[[hue, 200, 230]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return tuple(int(v) for v in bgr)


@torch.no_grad()
def head_row(model, tokens, ks, ref, row: int):
    """Density along the query row for head 0's x axis, its offsets per k, and the landing edge coordinates."""
    attn = model.attn
    query, value = model.queries(ks), model.tokens(tokens)
    n, len_q = ks.shape
    offsets = attn.sampling_offsets(query).view(n, len_q, attn.n_heads, 1, attn.n_points, 2)
    w, k_max = model.task.width, model.task.max_k
    cope = attn.cope
    picked = range(row * k_max, (row + 1) * k_max)  # the K queries of that row
    # The module's own code: each query's mixed density along its row (head 0), and where its points land.
    density = torch.stack(
        [cope.line_densities(query[0, q : q + 1], ref[0, q], value[:1], model.shapes)[0][0][0] for q in picked]
    )  # (K, W)
    landing = cope(query, ref, offsets, value, model.shapes)[0, row * k_max : (row + 1) * k_max, 0, 0, :, 0] * w
    e_ref = ref[0, row * k_max : (row + 1) * k_max, 0, :1] * w  # (K, 1)
    u = offsets[0, row * k_max : (row + 1) * k_max, 0, 0, :, 0]  # (K, P)
    return density.numpy(), u.numpy(), landing.numpy(), e_ref[:, 0].numpy()


def draw_panel(img, top: int, title: str, tokens_row, density, u, landing, e_ref, weights) -> None:
    """One row: the image row with landing points, its count density, and the cumulative count."""
    w = len(tokens_row)
    x_of = lambda e: int(MARGIN + e * CELL)  # noqa: E731  (edge coordinate -> canvas x)
    black, grey = (0, 0, 0), (150, 150, 150)
    cv2.putText(img, title, (MARGIN, top), 0, 0.5, black, 1)
    row_y = top + 12
    for j, t in enumerate(tokens_row):
        colour = class_colour(int(t)) if t > 0 else (225, 225, 225)
        cv2.rectangle(img, (x_of(j), row_y), (x_of(j + 1) - 1, row_y + CELL), colour, -1)
    cv2.drawMarker(img, (x_of(e_ref[0]), row_y + CELL // 2), black, cv2.MARKER_CROSS, 12, 2)
    for k in range(len(u)):
        best = int(np.argmax(weights[k]))  # the point the query weights most
        y = row_y + CELL + 8 + 8 * k
        cv2.putText(img, f"k={k + 1}", (MARGIN - 40, y + 4), 0, 0.35, K_COLOURS[k], 1)
        for p in range(u.shape[1]):
            cv2.circle(img, (x_of(e_ref[k] + u[k, p]), y), 3, K_COLOURS[k], 1)
            cv2.circle(img, (x_of(landing[k, p]), y), 4 if p == best else 2, K_COLOURS[k], -1)
    dens_top, dens_h = row_y + CELL + 40, 40
    d = density[0]
    for j, v in enumerate(d):
        y0 = dens_top + dens_h
        cv2.rectangle(img, (x_of(j) + 1, int(y0 - dens_h / 2 * v)), (x_of(j + 1) - 2, y0), (120, 80, 30), -1)
    cv2.line(img, (MARGIN, dens_top + dens_h // 2), (x_of(w), dens_top + dens_h // 2), grey, 1)
    cv2.putText(img, "density 1", (x_of(w) + 4, dens_top + dens_h // 2 + 4), 0, 0.35, grey, 1)
    edges = np.concatenate([[0.0], np.cumsum(d)])
    c_ref = np.interp(e_ref[0], np.arange(w + 1), edges)
    count_top, count_h = dens_top + dens_h + 15, 110
    y_of = lambda c: int(count_top + count_h - (c - edges[0]) * count_h / max(1.0, edges[-1]))  # noqa: E731
    pts = np.array([[x_of(e), y_of(c)] for e, c in enumerate(edges)], np.int32)
    cv2.polylines(img, [pts], False, black, 1)
    cv2.line(img, (x_of(e_ref[0]), count_top), (x_of(e_ref[0]), count_top + count_h), grey, 1)
    for k in range(len(u)):
        for p in range(u.shape[1]):
            y = y_of(c_ref + u[k, p])
            cv2.line(img, (x_of(e_ref[0]) - 6, y), (x_of(e_ref[0]), y), K_COLOURS[k], 2)
            cv2.line(img, (x_of(e_ref[0]), y), (x_of(landing[k, p]), y), K_COLOURS[k], 1, cv2.LINE_AA)
            cv2.circle(img, (x_of(landing[k, p]), y), 3, K_COLOURS[k], -1)


def draw(panels: list[tuple], path: str) -> None:
    w = len(panels[0][1])
    width, panel_h = MARGIN * 2 + w * CELL + 40, 300
    img = np.full((40 + panel_h * len(panels), width, 3), 255, np.uint8)
    legend = (
        "+ reference; filled dots: cope sampling points (large: most weighted), open: same offsets as pixels; "
        "bars: head 0 count density; curve: count from the reference, ticks: offsets u"
    )
    cv2.putText(img, legend, (10, 20), 0, 0.38, (0, 0, 0), 1)
    for i, panel in enumerate(panels):
        draw_panel(img, 50 + i * panel_h, *panel)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    cv2.imwrite(path, img)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/cope_gates.png")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="deformable: the native extension")
    opts = argparse.Namespace(d_model=32, heads=2, points=4, lr=3e-3, steps=args.steps, batch=32, gaps=(2, 5))
    opts.variant = "default"
    task = Task()
    model = train(task, "cope", args.seed, opts).eval()
    panels = []
    for title, gaps in (("trained gaps 2-5", (2, 5)), ("unseen gaps 6-12", (6, 12))):
        tokens, ks, ref, _ = make_batch(task, 1, gaps, torch.Generator().manual_seed(args.seed + 7))
        density, u, landing, e_ref = head_row(model, tokens, ks, ref, row=0)
        with torch.no_grad():
            query = model.queries(ks)[0, : task.max_k]
            weights = model.attn.attention_weights(query).view(task.max_k, model.attn.n_heads, -1)[:, 0].numpy()
        row = tokens.view(task.height, task.width)[0].numpy()
        panels.append((title, row, density, u, landing, e_ref, weights))
    draw(panels, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
