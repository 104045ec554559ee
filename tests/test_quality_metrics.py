"""Label-quality metrics (IoU, contour band, CD-IoU), checked against closed-form answers."""

from __future__ import annotations

import numpy as np
import pytest
from quality_helpers import GT, H, W, closed_form_cd_iou, rect_mask, shifted

from pseudolabel.quality.gold import contour_band, contour_discounted_iou, iou

# --- metrics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dx, dy", [(0, 0), (4, 0), (0, 3), (-6, 2), (10, 10), (45, 0)])
def test_iou_of_shifted_rectangles(dx, dy):
    w, h = GT[2] - GT[0], GT[3] - GT[1]
    inter = max(w - abs(dx), 0) * max(h - abs(dy), 0)
    assert iou(rect_mask(shifted(GT, dx, dy)), rect_mask(GT)) == pytest.approx(
        inter / (2 * w * h - inter), abs=1e-12
    )


def test_iou_edge_cases():
    empty = np.zeros((H, W), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, rect_mask(GT)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        iou(empty, empty[:-1])


def test_contour_band_of_a_rectangle_is_the_ring_of_half_width_w():
    band = contour_band(rect_mask(GT), 2)
    expected = rect_mask((18, 13, 62, 47)) & ~rect_mask((22, 17, 58, 43))
    np.testing.assert_array_equal(band, expected)
    assert not contour_band(rect_mask(GT), 0).any()


def test_the_image_border_is_not_a_contour():
    touching = rect_mask((0, 0, 30, 60))  # left, top and bottom edges lie on the image border
    band = contour_band(touching, 3)
    np.testing.assert_array_equal(band, rect_mask((27, 0, 33, 60)))


@pytest.mark.parametrize("dx, dy", [(4, 0), (0, 3), (-6, 2), (10, 10), (1, 1)])
@pytest.mark.parametrize("factor, w", [(0.5, 2), (1.0, 3), (0.25, 1), (0.9, 5)])
def test_contour_discounted_iou_matches_the_closed_form(dx, dy, factor, w):
    pred = shifted(GT, dx, dy)
    got = contour_discounted_iou(rect_mask(pred), rect_mask(GT), factor, w)
    assert got == pytest.approx(closed_form_cd_iou(pred, GT, factor, w), abs=1e-12)


def test_contour_discount_zero_is_plain_iou_and_forgives_boundary_errors():
    pred, gt = rect_mask(shifted(GT, 2, 0)), rect_mask(GT)
    assert contour_discounted_iou(pred, gt, 0.0, 3) == iou(pred, gt)
    assert contour_discounted_iou(pred, gt, 0.5, 0) == iou(pred, gt)
    # A 2-px shift lies entirely inside a 3-px band: fully discounted, it is a perfect match.
    assert contour_discounted_iou(pred, gt, 1.0, 3) == 1.0
    assert iou(pred, gt) < contour_discounted_iou(pred, gt, 0.5, 3) < 1.0
    with pytest.raises(ValueError, match="factor"):
        contour_discounted_iou(pred, gt, 1.5, 3)
