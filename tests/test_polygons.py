"""Masks -> COCO polygons (``rle.polygons``), checked by rasterising them back with pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pseudolabel.rle import encode_host_masks, polygons, rle_object

H, W = 60, 80
YY, XX = np.mgrid[:H, :W]


def rle_of(mask: np.ndarray) -> dict:
    """Through the project's own stored form: compressed counts as a str."""
    encoded = encode_host_masks(mask[None])
    return rle_object(encoded.counts[0], H, W)


def rasterised(polys: list[list[float]]) -> np.ndarray:
    if not polys:
        return np.zeros((H, W), bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, H, W))).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def disc(cx: float, cy: float, r: float) -> np.ndarray:
    return (XX - cx) ** 2 + (YY - cy) ** 2 < r**2


SHAPES = {
    "square": (XX >= 10) & (XX < 20) & (YY >= 5) & (YY < 15),
    "disc": disc(40, 30, 15),
    "triangle": (XX >= 5) & (YY < H - 5) & (YY - 5 > XX - 5),
    "L": ((XX >= 50) & (XX < 54) & (YY >= 10) & (YY < 50))
    | ((XX >= 50) & (XX < 75) & (YY >= 46) & (YY < 50)),
    "one-pixel line": (XX == 7) & (YY >= 3) & (YY < 40),
    "diagonal": (XX == YY) & (XX < 30),
    "whole image": np.ones((H, W), bool),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_round_trip_of_hole_free_shapes(name):
    """The polygons trace pixel edges: rasterised back they give exactly the same pixels."""
    mask = SHAPES[name]
    polys = polygons(rle_of(mask))
    assert len(polys) == 1 and all(len(p) % 2 == 0 and len(p) >= 6 for p in polys)
    np.testing.assert_array_equal(rasterised(polys), mask)


def test_square_is_its_pixel_edge_outline():
    assert polygons(rle_of(SHAPES["square"])) == [[10.0, 5.0, 10.0, 15.0, 20.0, 15.0, 20.0, 5.0]]
    single = (XX == 3) & (YY == 4)
    assert polygons(rle_of(single)) == [[3.0, 4.0, 3.0, 5.0, 4.0, 5.0, 4.0, 4.0]]


def test_two_parts_and_a_hole():
    """One polygon per part, largest first; the hole is filled (COCO polygons cannot hold holes)."""
    ring = disc(25, 30, 18) & ~disc(25, 30, 5)
    blob = (XX >= 55) & (XX < 70) & (YY >= 10) & (YY < 20)
    mask = ring | blob
    polys = polygons(rle_of(mask))
    assert len(polys) == 2
    first = rasterised(polys[:1])
    assert first[30, 25] and not first[15, 60]  # the ring (larger) first, its hole filled
    back = rasterised(polys)
    assert back[disc(25, 30, 5)].all()
    assert iou(back, mask) > 0.9
    np.testing.assert_array_equal(back, mask | disc(25, 30, 5))  # exactly the parts, holes filled


def test_parts_one_pixel_apart_stay_apart():
    mask = (YY < 5) & (((XX >= 3) & (XX < 6)) | ((XX >= 7) & (XX < 10)))
    polys = polygons(rle_of(mask))
    assert len(polys) == 2
    assert not rasterised(polys)[:5, 6].any()


def test_tolerance_simplifies():
    mask = disc(40, 30, 25)
    exact, simple = polygons(rle_of(mask)), polygons(rle_of(mask), tolerance=1.0)
    assert len(simple[0]) < len(exact[0]) / 2
    assert iou(rasterised(simple), mask) > 0.95
    # A sliver thinner than the tolerance collapses to fewer than 3 vertices and is dropped.
    sliver = (YY == 10) & (XX >= 5) & (XX < 60)
    assert polygons(rle_of(sliver), tolerance=5.0) == []


def test_empty_mask_and_bytes_counts():
    assert polygons(rle_of(np.zeros((H, W), bool))) == []
    rle = mask_utils.encode(np.asfortranarray(SHAPES["disc"].astype(np.uint8)))  # counts as bytes
    assert polygons(rle) == polygons(rle_of(SHAPES["disc"]))
