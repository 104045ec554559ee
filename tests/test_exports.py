"""Dataset exports (pseudolabel/exports): each format read back by its consumer's reader and compared with
the source masks, the brush RLE against Label Studio's own encoder, and the atomic, versioned publish."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from pycocotools import mask as mask_utils

from pseudolabel import layout
from pseudolabel.exports import ExportBatch, export_dataset, read_current_export
from pseudolabel.exports.label_studio import (
    brush_rle_decode,
    brush_rle_encode,
    label_config,
    prediction_result,
    task,
)
from pseudolabel.exports.yolo import join_parts, label_line
from pseudolabel.labels.coco import EMPTY_PHRASE_NAME, coco_problems, load_coco
from pseudolabel.rle import polygons
from pseudolabel.storage import LocalObjectStore, ObjectStore
from pseudolabel.testing.labels import encode_mask

CATEGORIES = sorted(["cat", "dog", EMPTY_PHRASE_NAME])
MODEL_VERSION = "gdino-sam2@abc123"


def url_of(key: str) -> str:
    return f"http://images.test/{key}"


def grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[:height, :width]


def rectangle(height, width, x0, y0, x1, y1) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def disk(height, width, cx, cy, r) -> np.ndarray:
    yy, xx = grid(height, width)
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def l_shape(height, width) -> np.ndarray:
    return rectangle(height, width, 10, 8, 18, 60) | rectangle(height, width, 10, 52, 70, 60)


def two_blobs(height, width) -> np.ndarray:
    return disk(height, width, 22, 20, 12) | rectangle(height, width, 60, 40, 90, 62)


# image_id -> (split, height, width, [(candidate_id, phrase, mask, verified)]); three shards.
SHARDS = [
    {
        "a0": (
            "train",
            72,
            96,
            [(0, "cat", rectangle(72, 96, 5, 6, 40, 30), False), (3, "dog", disk(72, 96, 60, 40, 20), True)],
        ),
        "a1": ("train", 72, 96, []),  # a background image
        "a2": ("val", 72, 96, [(1, "", l_shape(72, 96), False), (2, "cat", two_blobs(72, 96), False)]),
    },
    {
        "b0": (
            "train",
            64,
            100,
            [
                (0, "dog", np.zeros((64, 100), bool), False),
                (1, "cat", rectangle(64, 100, 0, 0, 100, 64), False),
            ],
        ),
        "b1": ("test", 64, 100, [(5, "cat", disk(64, 100, 50, 32, 25), False)]),
    },
    {"c0": ("val", 72, 96, [])},
]
SOURCE_MASKS = {
    (image_id, cid): mask
    for shard in SHARDS
    for image_id, (_split, _h, _w, instances) in shard.items()
    for cid, _phrase, mask, _verified in instances
}
PHRASES = {
    (image_id, cid): phrase or EMPTY_PHRASE_NAME
    for shard in SHARDS
    for image_id, (_split, _h, _w, instances) in shard.items()
    for cid, phrase, _mask, _verified in instances
}
EMPTY = ("b0", 0)


def jpeg(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def source_key(image_id: str) -> str:
    return layout.image(f"shard-{image_id[0]}", image_id)


def put_sources(store: ObjectStore) -> None:
    for number, shard in enumerate(SHARDS):
        for image_id, (_split, height, width, _instances) in shard.items():
            store.put_bytes(source_key(image_id), jpeg(height, width, number))


def batch_of(shard: dict) -> ExportBatch:
    images = pd.DataFrame(
        [
            {
                "image_id": image_id,
                "split": split,
                "source_key": source_key(image_id),
                "width": width,
                "height": height,
                "model_version": MODEL_VERSION,
            }
            for image_id, (split, height, width, _instances) in shard.items()
        ]
    )
    rows = [
        {
            "image_id": image_id,
            "candidate_id": cid,
            "phrase": phrase,
            "rle_counts": encode_mask(mask)["counts"],
            "height": height,
            "width": width,
            "box_score": 0.5 + cid / 20,
            "text_score": 0.4,
            "mask_score": float("nan") if cid == 5 else 0.9 - cid / 20,  # a score the backend did not make
            "mask_area": int(mask.sum()),
            "verified": verified,
        }
        for image_id, (_split, height, width, instances) in shard.items()
        for cid, phrase, mask, verified in instances
    ]
    return ExportBatch(images=images, instances=pd.DataFrame(rows))


def batches() -> Iterator[ExportBatch]:
    for shard in SHARDS:
        yield batch_of(shard)


def export(store: ObjectStore, version: str = "v1", **options):
    return export_dataset(
        store,
        options.pop("batches", batches()),
        version=version,
        categories=CATEGORIES,
        image_url=url_of,
        info={"description": "test export"},
        **options,
    )


def split_of(image_id: str) -> str:
    return next(shard[image_id][0] for shard in SHARDS if image_id in shard)


def image_ids(split: str) -> list[str]:
    return [i for shard in SHARDS for i, spec in shard.items() if spec[0] == split]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def area_sampled(points_px: np.ndarray, height: int, width: int, k: int = 8) -> np.ndarray:
    """Rasterise a polygon in pixel-edge coordinates with cv2.fillPoly at k x resolution; a pixel is in
    when most of it is covered (fillPoly also fills its boundary: at 1/k px that decides nothing)."""
    canvas = np.zeros((height * k, width * k), np.uint8)
    cv2.fillPoly(canvas, [np.round(np.asarray(points_px) * k).astype(np.int32)], 1)
    return canvas.reshape(height, k, width, k).mean(axis=(1, 3)) > 0.5


@pytest.fixture
def local(tmp_path) -> LocalObjectStore:
    store = LocalObjectStore(tmp_path / "store")
    put_sources(store)
    return store


# -- COCO ------------------------------------------------------------------------------------------


def test_coco_rle_reads_back_exactly_with_pycocotools(store):
    """On both backends: COCO files (put_file), image copies, ids in stream order, exact masks."""
    put_sources(store)
    summary = export(store, formats=("coco",))
    root = layout.exports_version_root("v1")
    assert summary.images == {"train": 3, "val": 2, "test": 1}
    assert summary.instances == {"coco": len(SOURCE_MASKS) - 1} and summary.dropped == {"coco_empty_mask": 1}
    for split in ("train", "val", "test"):
        coco = load_coco(store.get_bytes(layout.export_coco(root, split)))
        assert coco_problems(coco) == []
        assert [c["name"] for c in coco.dataset["categories"]] == CATEGORIES
        images = coco.dataset["images"]
        assert [i["pseudolabel_image_id"] for i in images] == image_ids(split)  # stream order
        assert [i["id"] for i in images] == list(range(1, len(images) + 1))
        annotations = coco.dataset["annotations"]
        assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
        by_id = {i["id"]: i for i in images}
        for ann in annotations:
            image = by_id[ann["image_id"]]
            source = SOURCE_MASKS[(image["pseudolabel_image_id"], ann["candidate_id"])]
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), source)
            assert ann["area"] == source.sum() and ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            ys, xs = np.nonzero(source)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            key = (image["pseudolabel_image_id"], ann["candidate_id"])
            assert ann["verified"] == (key == ("a0", 3))
            assert CATEGORIES[ann["category_id"] - 1] == PHRASES[key]
        for image in images:  # file_name is relative to images/<split>/ and the copy is the source JPEG
            key = f"{root}/images/{split}/{image['file_name']}"
            assert store.get_bytes(key) == store.get_bytes(source_key(image["pseudolabel_image_id"]))
            decoded = cv2.imdecode(np.frombuffer(store.get_bytes(key), np.uint8), cv2.IMREAD_COLOR)
            assert decoded.shape[:2] == (image["height"], image["width"])
    nan_score = next(
        a for a in load_coco(store.get_bytes(layout.export_coco(root, "test"))).dataset["annotations"]
    )
    assert nan_score["mask_score"] is None  # NaN is not JSON


def test_coco_polygons_rasterise_back_to_the_masks(local):
    export(local, formats=("coco",), coco_segmentation="polygon")
    root = layout.exports_version_root("v1")
    checked = 0
    for split in ("train", "val", "test"):
        coco = load_coco(local.get_bytes(layout.export_coco(root, split)))
        by_id = {i["id"]: i for i in coco.dataset["images"]}
        for ann in coco.dataset["annotations"]:
            image = by_id[ann["image_id"]]
            assert isinstance(ann["segmentation"], list) and all(len(p) >= 6 for p in ann["segmentation"])
            rles = mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"])
            back = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
            assert iou(back, SOURCE_MASKS[(image["pseudolabel_image_id"], ann["candidate_id"])]) >= 0.98
            checked += 1
    assert checked == len(SOURCE_MASKS) - 1


# -- YOLO ------------------------------------------------------------------------------------------


def read_yolo(
    store: ObjectStore, root: str, split: str, image_id: str
) -> tuple[list[tuple[int, np.ndarray]], int, int]:
    """A label file parsed as Ultralytics documents it ("<class> x1 y1 ...", normalised), denormalised by
    the exported image's own size; returns [(class, (N, 2) pixel points)], height, width."""
    pixels = cv2.imdecode(
        np.frombuffer(store.get_bytes(layout.export_image(root, split, image_id)), np.uint8), 1
    )
    height, width = pixels.shape[:2]
    lines = []
    for line in store.get_text(layout.export_yolo_labels(root, split, image_id)).splitlines():
        numbers = line.split()
        class_index, coords = int(numbers[0]), np.array(numbers[1:], np.float64)
        assert len(coords) % 2 == 0 and len(coords) >= 6 and ((coords >= 0) & (coords <= 1)).all()
        lines.append((class_index, coords.reshape(-1, 2) * (width, height)))
    return lines, height, width


def test_yolo_labels_rasterise_back_to_the_masks(local):
    summary = export(local, formats=("yolo",))
    root = layout.exports_version_root("v1")
    assert summary.dropped == {"yolo_outline_lt_3_points": 1} and summary.instances == {
        "yolo": len(SOURCE_MASKS) - 1
    }
    assert not any(k.key.endswith(".json") for k in local.list(root + "/"))  # no COCO asked for
    checked = 0
    for shard in SHARDS:
        for image_id, (split, _h, _w, instances) in shard.items():
            lines, height, width = read_yolo(local, root, split, image_id)
            kept = [(cid, phrase, mask) for cid, phrase, mask, _v in instances if (image_id, cid) != EMPTY]
            assert len(lines) == len(kept)  # one line per instance; background images: an empty file
            for (class_index, points), (_cid, phrase, mask) in zip(lines, kept, strict=True):
                assert CATEGORIES[class_index] == (phrase or EMPTY_PHRASE_NAME)
                assert iou(area_sampled(points, height, width), mask) >= 0.98
                ultralytics = np.zeros((height, width), np.uint8)  # polygon2mask: int32 truncation, fillPoly
                cv2.fillPoly(ultralytics, [points.astype(np.int32)], 1)
                if len(polygons(encode_mask(mask))) == 1:
                    # a single-part shape: every mask pixel, plus at most a one-pixel rim
                    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                    assert (mask <= ultralytics.astype(bool)).all() and (
                        ultralytics.astype(bool) <= grown
                    ).all()
                checked += 1
    assert checked == len(SOURCE_MASKS) - 1

    data = yaml.safe_load(local.get_text(layout.export_data_yaml(root)))
    assert data["names"] == dict(enumerate(CATEGORIES)) and data["nc"] == len(CATEGORIES)
    assert {k: data[k] for k in ("train", "val", "test")} == {
        s: f"images/{s}" for s in ("train", "val", "test")
    }
    assert "path" not in data  # split folders resolve against the yaml's own folder


def test_data_yaml_lists_exactly_the_splits_given(local):
    only_train_val = [batch_of({k: v for k, v in shard.items() if v[0] != "test"}) for shard in SHARDS]
    summary = export(local, formats=("yolo",), batches=iter(only_train_val))
    assert set(summary.images) == {"train", "val"}
    data = yaml.safe_load(local.get_text(layout.export_data_yaml(summary.root)))
    assert "test" not in data and data["train"] == "images/train" and data["val"] == "images/val"
    assert not any("/test/" in info.key for info in local.list(summary.root + "/"))


def test_join_parts_connects_blobs_without_adding_area():
    mask = two_blobs(72, 96) | rectangle(72, 96, 80, 2, 94, 10)  # three parts
    parts = [np.asarray(p).reshape(-1, 2) for p in polygons(encode_mask(mask))]
    assert len(parts) == 3
    joined = join_parts(parts)
    assert len(joined) == sum(len(p) for p in parts) + 2 * 2  # each connection: both ends visited twice
    back = mask_utils.decode(mask_utils.frPyObjects([joined.reshape(-1).tolist()], 72, 96)[0]).astype(bool)
    np.testing.assert_array_equal(back, mask)  # the connections have zero width
    assert iou(area_sampled(joined, 72, 96), mask) >= 0.98


def test_label_lines_hold_the_normalised_outline():
    on_grid = np.array([[0.0, 0.0], [63.5, 0.5], [64.0, 48.0], [10.5, 47.5]])
    off_grid = on_grid * 0.99 + 0.013  # not on half pixels: formatted one by one
    for outline in (on_grid, off_grid):
        class_index, *numbers = label_line(4, outline, 64, 48).split()
        assert class_index == "4" and all(len(n.split(".")[1]) == 6 for n in numbers)
        np.testing.assert_allclose(np.array(numbers, float).reshape(-1, 2), outline / (64, 48), atol=5e-7)
    assert label_line(0, np.array([[-1.0, 2.0], [70.0, 50.0], [3.0, 4.0]]), 64, 48).split()[1:5] == [
        "0.000000",
        "0.041667",
        "1.000000",
        "1.000000",
    ]  # clipped to the image


# -- Label Studio ----------------------------------------------------------------------------------


def read_tasks(store: ObjectStore, root: str) -> dict[str, dict]:
    tasks = {}
    for split in ("train", "val", "test"):
        for item in json.loads(store.get_bytes(layout.export_label_studio_tasks(root, split))):
            assert item["data"]["split"] == split
            tasks[item["data"]["image_id"]] = item
    return tasks


def test_label_studio_brush_tasks_decode_to_the_masks(local):
    summary = export(local, formats=("label_studio",))
    root = summary.root
    assert summary.dropped == {"label_studio_empty_mask": 1}
    assert not any("/images/" in info.key for info in local.list(root + "/"))  # tasks point at the sources
    tasks = read_tasks(local, root)
    assert sorted(tasks) == sorted(i for shard in SHARDS for i in shard)
    for image_id, item in tasks.items():
        assert item["data"]["image"] == url_of(source_key(image_id))
        (prediction,) = item["predictions"]
        assert prediction["model_version"] == MODEL_VERSION
        expected = [(cid, m) for (i, cid), m in SOURCE_MASKS.items() if i == image_id and (i, cid) != EMPTY]
        assert [r["id"] for r in prediction["result"]] == [f"c{cid}" for cid, _m in expected]
        for result, (_cid, mask) in zip(prediction["result"], expected, strict=True):
            assert (result["type"], result["from_name"], result["to_name"]) == (
                "brushlabels",
                "label",
                "image",
            )
            assert (result["original_height"], result["original_width"]) == mask.shape
            assert result["value"]["format"] == "rle" and result["image_rotation"] == 0
            assert result["value"]["brushlabels"][0] in CATEGORIES
            np.testing.assert_array_equal(brush_rle_decode(result["value"]["rle"], *mask.shape), mask)
        scores = [r["score"] for r in prediction["result"] if "score" in r]
        assert prediction["score"] == pytest.approx(np.mean(scores) if scores else 0.0)
    assert "score" not in tasks["b1"]["predictions"][0]["result"][0]  # NaN mask score: no score

    config = ET.fromstring(local.get_text(layout.export_label_studio_config(root)))
    assert config.find("Image").attrib["name"] == "image" and config.find("Image").attrib["value"] == "$image"
    brush = config.find("BrushLabels")
    assert brush.attrib == {"name": "label", "toName": "image"}
    assert [label.attrib["value"] for label in brush.findall("Label")] == CATEGORIES


def test_label_studio_polygons_round_trip(local):
    summary = export(local, formats=("label_studio",), label_studio_masks="polygon")
    assert summary.dropped == {"label_studio_outline_lt_3_points": 1}
    tasks = read_tasks(local, summary.root)
    checked = 0
    for image_id, item in tasks.items():
        for result in item["predictions"][0]["result"]:
            mask = SOURCE_MASKS[(image_id, int(result["id"][1:]))]
            height, width = mask.shape
            points = np.asarray(result["value"]["points"]).reshape(-1, 2)
            assert result["type"] == "polygonlabels" and ((points >= 0) & (points <= 100)).all()
            pixels = points * (width / 100.0, height / 100.0)  # what label_studio_sdk's COCO converter does
            back = mask_utils.decode(mask_utils.frPyObjects([pixels.reshape(-1).tolist()], height, width)[0])
            assert iou(back.astype(bool), mask) >= 0.98
            assert iou(area_sampled(pixels, height, width), mask) >= 0.98
            checked += 1
    assert checked == len(SOURCE_MASKS) - 1
    assert ET.fromstring(label_config(CATEGORIES, "polygon")).find("PolygonLabels") is not None


# Label Studio's own encoder (label_studio_sdk 2.1.2, converter/brush.py: mask2rle(mask * 255)) on these masks.
SDK_BRUSH_RLE = {
    "3x5 pattern": [0, 0, 0, 60, 57, 27, 252, 96, 17, 255, 223, 0, 183, 255, 24, 6, 19, 255, 0],
    "130x260, runs over 65,536": [
        0,
        2,
        16,
        32,
        57,
        27,
        255,
        255,
        255,
        0,
        255,
        126,
        224,
        24,
        159,
        255,
        129,
        243,
        128,
        98,
        127,
        254,
        31,
        222,
        0,
    ],
}


def sdk_masks() -> dict[str, np.ndarray]:
    small = np.zeros((3, 5), bool)
    small[0, 1] = True
    small[1, 1:4] = True
    small[2, :] = True
    return {"3x5 pattern": small, "130x260, runs over 65,536": rectangle(130, 260, 10, 125, 20, 127)}


@pytest.mark.parametrize("name", list(SDK_BRUSH_RLE))
def test_brush_rle_is_label_studio_sdk_byte_for_byte(name):
    mask = sdk_masks()[name]
    assert brush_rle_encode(mask) == SDK_BRUSH_RLE[name]
    np.testing.assert_array_equal(brush_rle_decode(SDK_BRUSH_RLE[name], *mask.shape), mask)


def test_brush_rle_round_trips_every_run_length():
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 53)) < p for p in (0.05, 0.5, 0.95)]
    masks += [np.zeros((300, 300), bool), np.ones((300, 300), bool), np.ones((1, 1), bool)]
    for n in (1, 2, 4, 5, 16, 17, 64, 65, 16384, 16385):  # runs of 4n values: each field size and split
        line = np.zeros((1, n + 2), bool)
        line[0, 1 : n + 1] = True
        masks.append(line)
    for mask in masks:
        rle = brush_rle_encode(mask)
        assert all(0 <= v <= 255 for v in rle)
        np.testing.assert_array_equal(brush_rle_decode(rle, *mask.shape), mask)
    with pytest.raises(ValueError, match="values"):
        brush_rle_decode(brush_rle_encode(masks[0]), 10, 10)
    with pytest.raises(ValueError, match="2-D"):
        brush_rle_encode(np.zeros((2, 2, 2), bool))


def test_prediction_result_and_task_for_the_review_queue():
    mask = two_blobs(72, 96)
    counts = encode_mask(mask)["counts"]
    brush = prediction_result(candidate_id=7, label="cat", rle_counts=counts, height=72, width=96, score=0.25)
    assert brush["id"] == "c7" and brush["score"] == 0.25
    np.testing.assert_array_equal(brush_rle_decode(brush["value"]["rle"], 72, 96), mask)
    polygon = prediction_result(
        candidate_id=7, label="cat", rle_counts=counts, height=72, width=96, score=None, mask_format="polygon"
    )
    assert polygon["value"]["polygonlabels"] == ["cat"] and "score" not in polygon
    one = task(
        "http://x/1.jpg", image_id="i1", split=None, results=[brush], model_version="m", data={"shard": "s"}
    )
    assert one["data"] == {"image": "http://x/1.jpg", "image_id": "i1", "shard": "s"}
    assert one["predictions"][0]["score"] == 0.25 and one["predictions"][0]["result"] == [brush]
    with pytest.raises(ValueError, match="brush"):
        prediction_result(
            candidate_id=1, label="a", rle_counts=counts, height=72, width=96, score=0, mask_format="png"
        )


# -- publish ---------------------------------------------------------------------------------------


def test_all_formats_and_the_current_pointer(local):
    summary = export(local)
    root = layout.exports_version_root("v1")
    assert summary.root == root and summary.instances == {
        n: len(SOURCE_MASKS) - 1 for n in ("coco", "yolo", "label_studio")
    }
    current = read_current_export(local)
    assert current["version"] == "v1" and current["root"] == root
    assert set(current) >= {"version", "root", "created_at", "formats", "counts", "info", "history"}
    assert current["formats"] == {
        "coco": {"segmentation": "rle"},
        "yolo": {},
        "label_studio": {"masks": "brush"},
    }
    assert current["counts"]["images"] == {"train": 3, "val": 2, "test": 1}
    assert current["info"] == {"description": "test export"}
    splits = {info.key.split("/")[-2] for info in local.list(f"{root}/images/")}
    assert splits == {"train", "val", "test"}
    n_images = sum(len(shard) for shard in SHARDS)
    assert len(list(local.list(f"{root}/images/"))) == len(list(local.list(f"{root}/labels/"))) == n_images


def test_batches_are_streamed_one_at_a_time(local):
    """Each batch is written before the next is read: nothing waits for the whole dataset."""
    root = layout.exports_version_root("v1")
    seen = []

    def watched() -> Iterator[ExportBatch]:
        for number, shard in enumerate(SHARDS):
            if number:
                previous = list(SHARDS[number - 1])
                written = [local.exists(layout.export_yolo_labels(root, split_of(i), i)) for i in previous]
                seen.append(all(written))
            yield batch_of(shard)

    export(local, formats=("coco", "yolo"), batches=watched())
    assert seen == [True, True]


class FailingStore(LocalObjectStore):
    """Fails the first write whose key contains ``fail_on``."""

    def __init__(self, root: Path, fail_on: str):
        super().__init__(root)
        self.fail_on = fail_on

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.fail_on in key:
            raise OSError(f"injected failure writing {key}")
        super().put_bytes(key, data)

    def put_file(self, key: str, path) -> None:
        if self.fail_on in key:
            raise OSError(f"injected failure writing {key}")
        super().put_file(key, path)


@pytest.mark.parametrize(
    "fail_on", ["labels/val/c0.txt", "annotations/instances_val.json", "tasks_test.json", "data.yaml"]
)
def test_a_failed_export_leaves_no_version_and_current_unchanged(local, fail_on):
    export(local, version="v1")
    before = local.get_bytes(layout.EXPORTS_CURRENT)
    v1 = sorted((i.key, i.size) for i in local.list(layout.exports_version_root("v1") + "/"))
    failing = FailingStore(local.root, fail_on)
    with pytest.raises(OSError, match="injected"):
        export(failing, version="v2")
    assert list(local.list(layout.exports_version_root("v2") + "/")) == []
    assert not (local.root / layout.exports_version_root("v2")).exists()
    assert local.get_bytes(layout.EXPORTS_CURRENT) == before
    assert sorted((i.key, i.size) for i in local.list(layout.exports_version_root("v1") + "/")) == v1


def test_a_failing_batch_source_leaves_no_version(local):
    def broken() -> Iterator[ExportBatch]:
        yield batch_of(SHARDS[0])
        raise RuntimeError("shard 1 unreadable")

    with pytest.raises(RuntimeError, match="unreadable"):
        export(local, batches=broken())
    assert list(local.list("exports/")) == [] and read_current_export(local) is None


def test_keep_versions_deletes_old_versions_after_the_flip(local):
    for version in ("v1", "v2", "v3"):
        summary = export(local, version=version, formats=("yolo",), keep_versions=2)
    assert summary.deleted_versions == ["v1"]
    assert list(local.list(layout.exports_version_root("v1") + "/")) == []
    assert any(True for _ in local.list(layout.exports_version_root("v2") + "/"))
    current = read_current_export(local)
    assert current["version"] == "v3" and [h["version"] for h in current["history"]] == ["v3", "v2"]
    with pytest.raises(ValueError, match="already exists"):
        export(local, version="v3")


def test_missing_source_images_are_skipped_from_every_format(local):
    local.delete(source_key("a0"))
    summary = export(local, formats=("coco", "yolo"))
    assert summary.skipped_images == 1 and "a0" in summary.skipped_examples[0]
    assert summary.images["train"] == 2 and summary.instances["coco"] == len(SOURCE_MASKS) - 3
    coco = load_coco(local.get_bytes(layout.export_coco(summary.root, "train")))
    assert "a0" not in {i["pseudolabel_image_id"] for i in coco.dataset["images"]}
    assert not local.exists(layout.export_yolo_labels(summary.root, "train", "a0"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"formats": ("coco", "voc")}, "coco.*yolo.*label_studio"),
        ({"formats": ()}, "choose from"),
        ({"coco_segmentation": "bitmap"}, "rle.*polygon"),
        ({"label_studio_masks": "png"}, "brush.*polygon"),
        ({"version": "../x"}, "version"),
        ({"keep_versions": 0}, "keep_versions"),
    ],
)
def test_options_are_validated(local, options, message):
    with pytest.raises(ValueError, match=message):
        export(local, **options)
    assert read_current_export(local) is None


def test_inconsistent_batches_are_refused_and_cleaned_up(local):
    wrong_class = batch_of(SHARDS[0])
    wrong_class.instances.loc[0, "phrase"] = "zebra"
    with pytest.raises(ValueError, match="zebra"):
        export(local, batches=iter([wrong_class]))
    wrong_size = batch_of(SHARDS[0])
    wrong_size.images.loc[0, "height"] = 50
    with pytest.raises(ValueError, match="pixel grid"):
        export(local, batches=iter([wrong_size]))
    bad_split = batch_of(SHARDS[0])
    bad_split.images.loc[0, "split"] = "holdout"
    with pytest.raises(ValueError, match="holdout"):
        export(local, batches=iter([bad_split]))
    assert list(local.list("exports/")) == []


def test_put_file_streams_a_big_file_atomically(store, tmp_path):
    path = tmp_path / "big.bin"
    data = (
        np.random.default_rng(0).integers(0, 255, 9 * 2**20, dtype=np.uint8).tobytes()
    )  # > S3 multipart threshold
    path.write_bytes(data)
    store.put_file("exports/big.bin", path)
    assert store.get_bytes("exports/big.bin") == data
    assert [i.key for i in store.list("exports/")] == ["exports/big.bin"]
    assert path.read_bytes() == data  # the source file is left as it was
