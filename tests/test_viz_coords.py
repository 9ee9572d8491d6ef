"""deformable.viz.coords and the preparation of images: resize and padding undone, back to original image pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _viz_utils import shapes_image, tiny_config, tiny_model

from deformable import recording
from deformable.data import resized_shape
from deformable.inference.images import prepare_batch
from deformable.viz.coords import image_to_canvas, level_to_image, query_at_pixel
from deformable.viz.sampling import query_view, select_detections

pytestmark = pytest.mark.usefixtures("one_thread")


def test_level_to_image_unpadded_and_padded() -> None:
    # Unpadded: normalised over the level is normalised over the image.
    xy = level_to_image(torch.tensor([0.5, 0.25]), torch.tensor([1.0, 1.0]), image_size=(60, 100))
    np.testing.assert_allclose(xy, [50.0, 15.0])
    # Padded: a 10x8 level whose first 6 columns and 4 rows are image (valid ratio 0.6, 0.5). Cell (j, i) covers
    # [j, j + 1] / 6 of the width and [i, i + 1] / 4 of the height of the 100x60 original.
    j, i = 2, 3
    centre = torch.tensor([(j + 0.5) / 10, (i + 0.5) / 8])
    xy = level_to_image(centre, torch.tensor([0.6, 0.5]), image_size=(60, 100))
    np.testing.assert_allclose(xy, [(j + 0.5) / 6 * 100, (i + 0.5) / 4 * 60])
    # The valid region's far edge is the original image's far edge.
    np.testing.assert_allclose(level_to_image(torch.tensor([0.6, 0.5]), torch.tensor([0.6, 0.5]), (60, 100)), [100, 60])


def test_image_to_canvas_uses_pixel_centres() -> None:
    np.testing.assert_allclose(image_to_canvas(np.array([3.5, 0.5]), 1), [3.0, 0.0])  # centre of pixel (3, 0)
    np.testing.assert_allclose(image_to_canvas(np.array([3.5, 0.5]), 4), [13.5, 1.5])  # middle of canvas 12..15


def test_query_at_pixel() -> None:
    shapes = torch.tensor([[8, 10], [4, 5]])
    ratios = torch.tensor([[0.6, 0.5], [0.6, 0.5]])  # level 0: 6 x 4 valid cells, level 1: 3 x 2
    # Pixel (55, 40) of a 100x60 image: level 0 cell (col 3, row 2), level 1 cell (col 1, row 1).
    assert query_at_pixel(55.5, 40.5, (60, 100), shapes, ratios, 0) == 2 * 10 + 3
    assert query_at_pixel(55.5, 40.5, (60, 100), shapes, ratios, 1) == 80 + 1 * 5 + 1
    assert query_at_pixel(99.9, 59.9, (60, 100), shapes, ratios, 0) == 3 * 10 + 5  # last valid cell
    with pytest.raises(ValueError, match="outside"):
        query_at_pixel(100.0, 10.0, (60, 100), shapes, ratios, 0)
    with pytest.raises(ValueError, match="levels 0..1"):
        query_at_pixel(1.0, 1.0, (60, 100), shapes, ratios, 2)


SMALL = (40, 40)


def trio() -> list[np.ndarray]:
    """Wide, tall and a small square image: resized to 64x85, 85x64 and 64x64, so the square one is padded below
    and to the right in a batch of the three."""
    return [shapes_image(90, 120), shapes_image(120, 90, seed=2), shapes_image(SMALL[0], SMALL[1], seed=1)]


def test_prepare_batch_resizes_like_validation_and_pads() -> None:
    cfg = tiny_config()
    images, mask = prepare_batch(trio(), cfg.data)
    assert resized_shape(90, 120, 64, 96) == (64, 85) and resized_shape(*SMALL, 64, 96) == (64, 64)
    assert images.shape == (3, 3, 85, 85)
    assert int((~mask[2]).sum()) == 64 * 64 and bool(mask[2, 64:].all()) and bool(mask[2, :, 64:].all())
    assert float(images[2, :, 64:].abs().max()) == 0.0 and float(images[2, :, :, 64:].abs().max()) == 0.0


def test_references_map_to_the_same_image_pixels_with_and_without_padding() -> None:
    """Decoder layer 0's reference points are learned (image-independent) and relative to the image, so mapped back
    they must land on ``sigmoid(...) * (W, H)`` of each original image, padded in a batch or not."""
    cfg = tiny_config()
    model = tiny_model()
    query_pos = model.query_embed.weight[:, :32]
    expected = model.transformer.reference_points(query_pos).sigmoid().detach().double().numpy()  # (Q, 2)
    height, width = SMALL
    for batch in (trio()[2:], trio()):
        images, mask = prepare_batch(batch, cfg.data)
        with torch.no_grad(), recording(model) as records:
            outputs = model(images, mask)
        record = records["transformer.decoder.layers.0.cross_attn"]
        b = len(batch) - 1  # the small image: padded in the second batch
        for q in range(5):
            view = query_view(record, q, SMALL, batch_index=b)
            np.testing.assert_allclose(view.reference, expected[q] * [width, height], rtol=1e-5)
        # Boxes use the same frame: the box centre is the reference plus the predicted shift.
        det = select_detections(outputs, SMALL, top_k=5, threshold=0.0, batch_index=b)
        boxes = outputs["pred_boxes"][b].double().numpy()
        for d in det:
            np.testing.assert_allclose((d.box[:2] + d.box[2:]) / 2, boxes[d.query, :2] * [width, height], rtol=1e-6)


def test_encoder_query_at_a_pixel_maps_back_to_its_cell() -> None:
    """The encoder reference of the query found at pixel (x, y) is the centre of the cell holding (x, y)."""
    cfg = tiny_config()
    model = tiny_model()
    images, mask = prepare_batch(trio(), cfg.data)
    with torch.no_grad(), recording(model) as records:
        model(images, mask)
    record = records["transformer.encoder.layers.0.self_attn"]
    ratios = record.valid_ratios()[2]
    assert bool((ratios[0] < 1).all())  # padded on both sides at level 0
    height, width = SMALL
    for level in range(2):
        h, w = record.spatial_shapes[level].tolist()
        cell_w, cell_h = width / round(float(ratios[level, 0]) * w), height / round(float(ratios[level, 1]) * h)
        for x, y in ((0.5, 0.5), (17.5, 33.5), (39.5, 39.5)):
            query = query_at_pixel(x, y, SMALL, record.spatial_shapes, ratios, level)
            rx, ry = query_view(record, query, SMALL, batch_index=2).reference
            assert abs(rx - x) <= cell_w / 2 + 1e-6 and abs(ry - y) <= cell_h / 2 + 1e-6
            assert rx == pytest.approx((np.floor(x / cell_w) + 0.5) * cell_w)
            assert ry == pytest.approx((np.floor(y / cell_h) + 0.5) * cell_h)
