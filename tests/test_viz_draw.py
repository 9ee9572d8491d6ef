"""deformable.viz.draw and deformable.viz.sampling.render: marks land on the expected pixels of a blank image."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from deformable.viz import draw
from deformable.viz.sampling import QueryView, render, select_detections

RED, GREEN = (0, 0, 255), (0, 255, 0)


def test_points_land_on_their_pixels_with_weight_as_size_and_opacity() -> None:
    canvas = np.zeros((40, 60, 3), dtype=np.uint8)
    xy = np.array([[10.0, 12.0], [40.0, 30.0]])
    draw.draw_points(canvas, xy, [RED, GREEN], np.array([1.0, 0.0]), max_radius=5.0, min_radius=1.5)
    assert tuple(canvas[12, 10]) == RED  # full weight: opaque
    assert tuple(canvas[12, 15]) == RED and tuple(canvas[12, 18]) == (0, 0, 0)  # radius 5 (+ antialiasing)
    assert tuple(canvas[30, 40]) == (0, round(0.35 * 255), 0)  # zero weight: the smallest, faintest disc
    assert tuple(canvas[30, 44]) == (0, 0, 0)  # radius 1.5
    touched = np.argwhere(canvas.any(-1))
    assert touched[:, 0].min() >= 6 and touched[:, 1].max() <= 44


def test_cross_and_box() -> None:
    canvas = np.zeros((30, 30, 3), dtype=np.uint8)
    draw.draw_cross(canvas, 15.0, 10.0, draw.WHITE, size=6, thickness=2)
    assert tuple(canvas[10, 15]) == draw.WHITE and tuple(canvas[6, 11]) == draw.WHITE
    assert tuple(canvas[10, 9]) == (0, 0, 0) and tuple(canvas[4, 15]) == (0, 0, 0)  # an x, not a +
    canvas = np.zeros((30, 30, 3), dtype=np.uint8)
    draw.draw_box(canvas, (5.0, 8.0, 20.0, 25.0), GREEN, thickness=2)
    for y, x in ((16, 5), (16, 20), (25, 12), (8, 12)):
        assert canvas[y, x, 1] >= 200 and canvas[y, x, 0] == 0, (y, x)
    assert tuple(canvas[16, 12]) == (0, 0, 0)


def _view(points: np.ndarray, weights: np.ndarray, reference=(25.5, 5.5)) -> QueryView:
    return QueryView(np.array(reference), points, weights, level_shapes=[(8, 10, 8, 10), (4, 5, 4, 5)])


def test_render_maps_image_coordinates_to_enlarged_canvas_pixels() -> None:
    """Image pixel (7, 3) is canvas pixels 21..23 x 9..11 at scale 3; a point at its centre lands in the middle."""
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    points = np.zeros((1, 2, 1, 2))  # (M, L, P, 2)
    points[0, 0, 0] = [7.5, 3.5]
    points[0, 1, 0] = [20.5, 15.5]
    weights = np.array([[[0.9], [0.1]]])
    figure = render(image, [_view(points, weights)], scale=3)
    assert figure.shape[1] == 90 and figure.shape[0] > 60  # the legend is below
    assert tuple(figure[10, 22]) == draw.colour(0)  # level 0 colour, full opacity (the heaviest point)
    faint = figure[46, 61]  # level 1 point at (20.5, 15.5) -> canvas (61, 46), weight 0.1 / 0.9
    strength = 0.1 / 0.9
    expected = np.round(np.array(draw.colour(1)) * (0.35 + 0.65 * strength))
    np.testing.assert_allclose(faint, expected, atol=1)
    assert tuple(figure[16, 76]) == draw.WHITE  # reference cross at (25.5, 5.5) -> canvas (76, 16)
    by_head = render(image, [_view(points, weights)], scale=3, color_by="head")
    assert tuple(by_head[10, 22]) == draw.colour(0) and tuple(by_head[46, 61]) != tuple(figure[46, 61])


def test_render_draws_the_box_on_its_edges_and_the_cope_strips() -> None:
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    view = _view(np.full((2, 2, 1, 2), 2.5), np.ones((2, 2, 1)) / 2)
    view.box, view.title = np.array([10.0, 4.0, 20.0, 16.0]), "thing 0.9"
    plain = render(image, [view], scale=2)
    assert tuple(plain[20, 20]) == draw.WHITE and tuple(plain[20, 39]) == draw.WHITE  # x edges 10, 20 -> 20, 39
    row = np.zeros((2, 10))
    row[:, 5:] = 2.0  # the right half of level 0's row counts 2 per pixel: drawn white (the maximum)
    view.densities = [(row, np.ones((2, 8))), (np.ones((2, 5)), np.ones((2, 4)))]
    with_strips = render(image, [view], scale=2)
    assert with_strips.shape[1] > plain.shape[1] and with_strips.shape[0] > plain.shape[0]
    strip_top = 40  # canvas height: the level 0 row strip starts right below
    assert tuple(with_strips[strip_top + 1, 10]) == (0, 0, 0)  # density 0 at x 5 (cell 1 of 10 over 30 px)
    assert tuple(with_strips[strip_top + 1, 50]) == draw.WHITE  # density 2 = max at x 25 (cell 8)
    assert tuple(with_strips[strip_top + 1, 4]) == draw.colour(0)  # tick: the sampling point at x 2.5


def test_select_detections_ranks_thresholds_and_scales() -> None:
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 1], logits[0, 2, 0] = 2.0, 0.0  # query 1 scores 0.88, query 2 0.5
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.5, 0.5, 0.2], [0.5, 0.5, 1.0, 1.0]]])
    found = select_detections({"pred_logits": logits, "pred_boxes": boxes}, (100, 200), top_k=5, threshold=0.4)
    assert [(d.query, d.label) for d in found] == [(1, 1), (2, 0)]
    np.testing.assert_allclose(found[0].box, [0.0, 40.0, 100.0, 60.0], atol=1e-5)
    assert found[0].score == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert select_detections({"pred_logits": logits, "pred_boxes": boxes}, (100, 200), 1, 0.4)[0].query == 1


def test_legend_and_tile() -> None:
    panel = draw.legend([(RED, "level 0"), (None, "x reference point")], width=300)
    assert panel.shape[1] == 300 and (panel != 255).any()
    assert tuple(panel[panel.shape[0] // 2, 13]) == RED or (panel == RED).all(-1).any()
    grid = draw.tile([np.zeros((10, 20, 3), np.uint8)] * 3, columns=2, gap=4)
    assert grid.shape == (24, 44, 3)


def test_save_image_creates_the_folder_and_names_a_path_it_cannot_write(tmp_path) -> None:
    image = np.zeros((4, 6, 3), np.uint8)
    image[1, 2] = (10, 20, 30)
    path = tmp_path / "new" / "figure.png"
    draw.save_image(str(path), image)
    assert np.array_equal(cv2.imread(str(path)), image)
    with pytest.raises(
        OSError, match=r"cannot write .*figure\.unknown \(6x4 pixels\): .*encoder.* \(use \.png or \.jpg\)"
    ):
        draw.save_image(str(tmp_path / "figure.unknown"), image)


def test_save_image_replaces_a_figure_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    path = tmp_path / "figure.png"
    first = np.full((4, 6, 3), 7, np.uint8)
    draw.save_image(str(path), first)
    monkeypatch.setattr(cv2, "imencode", lambda ext, image: (False, None))  # the encoder fails on the second
    with pytest.raises(OSError, match=r"cannot write .*figure\.png \(6x4 pixels\): OpenCV could not encode it"):
        draw.save_image(str(path), np.zeros((4, 6, 3), np.uint8))
    assert np.array_equal(cv2.imread(str(path)), first) and os.listdir(tmp_path) == ["figure.png"]
    monkeypatch.undo()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OSError, match=r"a_file is a file, not a folder"):
        draw.save_image(str(tmp_path / "a_file" / "figure.png"), first)
