"""COCO export, polygon export, RLE helpers and the shard checks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from pseudolabel.labels.coco import (
    build_coco,
    category_names,
    check_rles,
    coco_problems,
    coco_to_bytes,
    coco_with_polygons,
    image_mask_fractions,
    load_coco,
)
from pseudolabel.rle import (
    decode_rle,
    decode_union,
    polygons,
    rle_areas,
    rle_bboxes,
    rle_object,
    rle_objects,
    rle_run_totals,
    union_area,
)
from pseudolabel.testing.labels import encode_mask

H, W = 40, 60


def rect(x0, y0, x1, y1, height=H, width=W):
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def kept_rows(specs):
    """specs: (image_id, candidate_id, phrase, mask) -> PSEUDO_LABELS-like rows."""
    rows = []
    for image_id, cid, phrase, mask in specs:
        rows.append(
            {
                "image_id": image_id,
                "candidate_id": cid,
                "phrase": phrase,
                "rle_counts": encode_mask(mask)["counts"],
                "height": mask.shape[0],
                "width": mask.shape[1],
                "mask_area": int(mask.sum()),
                "box_score": 0.9 - cid / 10,
                "text_score": 0.8,
                "mask_score": 0.7,
            }
        )
    return pd.DataFrame(rows)


def images_table(ids):
    return pd.DataFrame(
        {"image_id": ids, "file_name": [f"images/s/{i}.jpg" for i in ids], "width": W, "height": H}
    )


def test_rle_areas_and_bboxes_match_decoded_masks_beyond_pycocotools_255_limit():
    rng = np.random.default_rng(0)
    masks = [rect(*sorted(rng.integers(0, W, 2)), *sorted(rng.integers(0, H, 2))) for _ in range(600)]
    rles = [rle_object(encode_mask(m)["counts"], H, W) for m in masks]
    np.testing.assert_array_equal(rle_areas(rles), [m.sum() for m in masks])
    first = rle_bboxes(rles)[0]
    ys, xs = np.nonzero(masks[0])
    if len(xs):
        assert first.tolist() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_rle_run_totals_agree_with_pycocotools():
    rng = np.random.default_rng(1)
    masks = [
        np.zeros((7, 9), np.uint8),
        np.ones((5, 4), np.uint8),
        rect(0, 0, 3, 3),
    ]  # starts with foreground
    for size in [(1, 1), (33, 17), (480, 640), (1500, 2500)]:  # large sizes need multi-chunk counts
        noisy = (rng.random(size) < 0.3).astype(np.uint8)
        blob = np.zeros(size, np.uint8)
        blob[size[0] // 3 :, size[1] // 4 :] = 1
        masks += [noisy, blob]
    strings = [encode_mask(m)["counts"] for m in masks]
    totals, areas, well_formed = rle_run_totals(strings)
    assert well_formed.all()
    assert totals.tolist() == [m.size for m in masks]
    assert areas.tolist() == [int(m.sum()) for m in masks]
    assert (
        areas.tolist()
        == rle_areas([rle_object(s, *m.shape) for s, m in zip(strings, masks, strict=True)]).tolist()
    )


def test_rle_run_totals_flag_what_pycocotools_decodes_silently():
    good = encode_mask(rect(5, 5, 40, 30))["counts"]
    silent = []
    for cut in range(1, len(good)):
        try:
            mask_utils.decode(rle_object(good[:cut], H, W))
        except ValueError:
            continue
        silent.append(good[:cut])  # no error from pycocotools...
    assert silent
    totals, _areas, _ok = rle_run_totals(silent)
    assert (totals != H * W).all()  # ...but the runs no longer cover the image
    truncated = silent[-1]
    totals, _areas, well_formed = rle_run_totals([truncated, good + "0", "", "~~", "é" + good[1:], good])
    assert totals[0] != H * W and totals[1] != H * W
    assert well_formed.tolist() == [True, True, False, False, False, True]
    assert totals[5] == H * W  # a broken string does not disturb the next one


def test_strings_pycocotools_would_overrun_never_reach_it():
    # pycocotools' rleFrString would parse past such a string's end (a last chunk that says "more", or
    # a NUL inside) and write counts beyond its buffer: heap corruption that crashed a later, unrelated
    # test at interpreter exit.
    good = encode_mask(rect(5, 5, 40, 30))["counts"]
    dangling = [good[:cut] for cut in range(1, len(good)) if (ord(good[cut - 1]) - 48) & 0x20]
    assert dangling
    for counts in [*dangling, good + "P"]:
        with pytest.raises(ValueError, match="ends inside a count"):
            rle_object(counts, H, W)
        with pytest.raises(ValueError, match="ends inside a count"):
            decode_rle(counts, H, W)
        with pytest.raises(ValueError, match="ends inside a count"):
            polygons({"size": [H, W], "counts": counts})
    for outside in [
        "é" + good,
        good[:3] + "\x00" + good[3:],
        good[:3] + "p" + good[3:],
        b"~" + good.encode(),
    ]:
        with pytest.raises(ValueError):
            rle_object(outside, H, W)
    for bad in [dangling[0], good + " ", "é" + good]:
        with pytest.raises(ValueError, match=r"RLE string #1 of 2 \(60x80\): "):
            rle_objects([good, bad], [60, 60], [80, 80])
    assert rle_objects([good], [60], [80]) == [rle_object(good, 60, 80)]
    assert decode_rle(good, H, W).sum() == 35 * 25


def test_union_counts_overlaps_once():
    a, b = rect(0, 0, 10, 10), rect(5, 5, 15, 15)
    rles = [rle_object(encode_mask(m)["counts"], H, W) for m in (a, b)]
    assert union_area(rles) == 100 + 100 - 25
    np.testing.assert_array_equal(decode_union(rles, H, W), a | b)
    assert decode_union([], H, W).sum() == 0


def test_coco_has_every_image_and_mask_derived_geometry():
    kept = kept_rows(
        [
            ("a", 0, "dog", rect(2, 3, 12, 8)),
            ("a", 1, "cat", rect(20, 20, 25, 30)),
            ("c", 0, "dog", rect(0, 0, 60, 40)),
        ]
    )
    kept["mask_area"] = 1  # stored columns are ignored: geometry comes from the RLE itself
    categories = category_names(["dog", "cat", "bird", None])
    coco = build_coco(kept, images_table(["a", "b", "c"]), categories=categories, info={"shard": "s"})
    assert [c["name"] for c in coco["categories"]] == ["bird", "cat", "dog", "object"]
    assert [(i["id"], i["pseudolabel_image_id"]) for i in coco["images"]] == [(1, "a"), (2, "b"), (3, "c")]
    first, second, third = coco["annotations"]
    assert first["area"] == 50 and first["bbox"] == [2, 3, 10, 5] and first["category_id"] == 3
    assert second["category_id"] == 2 and third["image_id"] == 3 and third["area"] == 2400
    assert first["box_score"] == pytest.approx(0.9) and first["iscrowd"] == 0

    loaded = load_coco(coco_to_bytes(coco))
    assert coco_problems(loaded) == []
    assert loaded.getAnnIds(imgIds=[2]) == []  # the empty image is listed, with no annotations
    np.testing.assert_array_equal(loaded.annToMask(loaded.anns[1]), rect(2, 3, 12, 8))


def test_coco_problems_are_reported():
    kept = kept_rows([("a", 0, "dog", rect(2, 3, 12, 8))])
    coco = build_coco(kept, images_table(["a"]), categories=["dog"])
    coco["annotations"][0]["category_id"] = 7
    coco["annotations"].append({**coco["annotations"][0], "id": 2, "image_id": 9})
    problems = coco_problems(load_coco(json.dumps(coco).encode()))
    assert (
        len(problems) == 2 and "unknown category_id 7" in problems[0] and "unknown image_id 9" in problems[1]
    )


def test_build_coco_refuses_instances_of_unlisted_images():
    with pytest.raises(ValueError, match="not in images"):
        build_coco(kept_rows([("z", 0, "dog", rect(0, 0, 5, 5))]), images_table(["a"]), categories=["dog"])


def test_polygon_coco_round_trips_to_the_rle_pixels():
    ellipse = np.zeros((H, W), np.uint8)
    yy, xx = np.mgrid[:H, :W]
    ellipse[((xx - 30) / 20) ** 2 + ((yy - 20) / 12) ** 2 <= 1] = 1
    kept = kept_rows([("a", 0, "dog", ellipse), ("a", 1, "dog", rect(0, 0, 1, 1))])
    coco = build_coco(kept, images_table(["a"]), categories=["dog"])
    polygon_coco, dropped = coco_with_polygons(coco)
    assert dropped == 0 and len(polygon_coco["annotations"]) == 2  # even a one-pixel mask has an outline
    assert coco["annotations"][0]["segmentation"]["counts"]  # the RLE original is untouched
    for annotation, mask in zip(polygon_coco["annotations"], (ellipse, rect(0, 0, 1, 1)), strict=True):
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(annotation["segmentation"], H, W)))
        np.testing.assert_array_equal(back, mask)  # pixel edges traced: nothing lost at the border


def test_check_rles_catches_corrupt_strings_and_wrong_areas():
    good = kept_rows([("a", 0, "dog", rect(0, 0, 30, 20)), ("b", 0, "dog", rect(5, 5, 10, 10))])
    assert check_rles(good).passed and check_rles(good).checked == 2
    bad = good.copy()
    bad.loc[0, "rle_counts"] = bad.loc[0, "rle_counts"][:-2]  # truncated: may even decode silently
    bad.loc[1, "mask_area"] = 3
    result = check_rles(pd.concat([bad, good.assign(rle_counts="")], ignore_index=True))
    assert not result.passed and result.num_failures == 4
    assert "b/0: decodes to 25 pixels, mask_area says 3" in result.failures
    assert any("empty RLE" in f for f in result.failures)


def test_image_mask_fractions_use_the_union():
    kept = kept_rows(
        [
            ("a", 0, "dog", rect(0, 0, 20, 20)),
            ("a", 1, "cat", rect(10, 10, 30, 30)),
            ("b", 0, "dog", rect(0, 0, 60, 10)),
        ]
    )
    fractions = image_mask_fractions(kept)
    assert fractions.to_dict() == {"a": pytest.approx((400 + 400 - 100) / 2400), "b": pytest.approx(0.25)}
    assert image_mask_fractions(kept.iloc[:0]).empty
