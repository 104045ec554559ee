"""The ``annotations`` detector backend: boxes and clicks from real COCO / JSONL files written here.

Runs on the orchestrator interpreter (no torch), like the backend itself.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import boto3
import numpy as np
import pytest
from PIL import Image

from pseudolabel.ids import image_id_for_url
from pseudolabel.models.annotations import AnnotationError, AnnotationPrompter, load_annotations
from pseudolabel.models.interfaces import Candidates, PreparedImage, detections_table
from pseudolabel.models.loading import DetectorSpec, ModelConfigError, load_detector
from pseudolabel.models.stages import DetectionSettings, ImageRef, detection_fingerprint, run_detection

W, H = 64, 48


def jpeg(width: int = W, height: int = H) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(buffer, "JPEG")
    return buffer.getvalue()


def url(name: str) -> str:
    return f"https://images.example.org/set/{name}"


def image(name: str, width: int = W, height: int = H) -> PreparedImage:
    """An image of ours as the detection stage hands it over (its id derives from its URL)."""
    return PreparedImage(image_id_for_url(url(name)), width, height, None, url=url(name))


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return str(path)


def write_coco(path: Path, images: list, annotations: list, categories: list | None = None) -> str:
    categories = [{"id": 1, "name": "tree"}, {"id": 2, "name": "shrub"}] if categories is None else categories
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


def coco_image(image_id: int, name: str, width: int = W, height: int = H) -> dict:
    return {
        "id": image_id,
        "file_name": f"train/{name}",
        "coco_url": url(name),
        "width": width,
        "height": height,
    }


def prompter(source: str, **spec) -> AnnotationPrompter:
    return load_detector(DetectorSpec(backend="annotations", variant="", annotations=source, **spec))


def detect_one(
    detector: AnnotationPrompter, prepared: PreparedImage, max_candidates: int = 300
) -> Candidates:
    return detector.detect([prepared], ["plant ."], max_candidates=max_candidates)[0]


# ---- COCO ----------------------------------------------------------------------------------------


def test_coco_boxes_through_the_detection_stage(tmp_path):
    """xywh -> xyxy in the stored pixels, file score or NaN, category names, best score first; the
    stage hands each image's URL over, and an image missing from the file gets zero candidates."""
    source = write_coco(
        tmp_path / "boxes.json",
        [coco_image(7, "a.jpg"), coco_image(8, "b.jpg")],
        [
            {"id": 1, "image_id": 7, "bbox": [2, 3, 10, 20], "category_id": 1},
            {"id": 2, "image_id": 7, "bbox": [30, 4, 5, 6], "category_id": 2, "score": 0.4},
            {"id": 3, "image_id": 7, "bbox": [1, 1, 2, 2], "category_id": 1, "score": 0.9},
            {"id": 4, "image_id": 8, "bbox": [0, 0, 64, 48], "category_id": 2, "iscrowd": 1},
        ],
    )
    detector = prompter(source)
    refs = [ImageRef(image_id_for_url(url(n)), W, H, url=url(n)) for n in ("a.jpg", "b.jpg", "c.jpg")]
    result = run_detection(refs, lambda _: jpeg(), detector, DetectionSettings(), workers=1)

    found = {c.image_id: c for c in result.images}
    a = found[refs[0].image_id]
    np.testing.assert_allclose(a.boxes, [[1, 1, 3, 3], [30, 4, 35, 10], [2, 3, 12, 23]])
    np.testing.assert_allclose(a.box_scores[:2], [0.9, 0.4], rtol=1e-6)
    assert math.isnan(a.box_scores[2]) and np.isnan(a.text_scores).all()
    assert a.phrases == ["tree", "shrub", "tree"]
    assert a.query_indices.tolist() == [2, 1, 0]  # the file's order
    assert a.points is None and a.box_prompts().all()
    assert len(found[refs[1].image_id]) == 0  # only a crowd annotation: skipped, counted below
    assert len(found[refs[2].image_id]) == 0  # not in the file
    table = detections_table(result.images)
    assert table.num_rows == 3 and table.column("box_prompt").to_pylist() == [True] * 3

    identity = detector.describe()
    assert identity["backend"] == "annotations" and identity["annotation_format"] == "coco"
    assert identity["annotation_counts"] == {
        "images": 2,
        "objects": 3,
        "boxes": 3,
        "objects_with_clicks": 0,
        "clicks": 0,
        "negative_clicks": 0,
        "crowd_skipped": 1,
        "boxes_clipped": 0,
    }
    report = detector.match_report()
    assert (report["images_seen"], report["images_matched"], report["images_without_annotations"]) == (
        3,
        2,
        1,
    )
    assert report["file_images_unmatched"] == 0


def test_coco_clicks_from_points_and_keypoints(tmp_path):
    """The points/point_labels extension (negative clicks included) and COCO keypoints (v > 0)."""
    source = write_coco(
        tmp_path / "clicks.json",
        [coco_image(1, "a.jpg")],
        [
            {
                "id": 5,
                "image_id": 1,
                "bbox": [10, 10, 20, 20],
                "points": [[15, 15], [28, 12]],
                "point_labels": [1, 0],
            },
            {"id": 6, "image_id": 1, "keypoints": [40, 30, 2, 0, 0, 0, 44, 33, 1], "category_id": 2},
        ],
    )
    found = detect_one(prompter(source, prompt_mode="box+point"), image("a.jpg"))
    assert found.phrases == ["object", "shrub"]
    np.testing.assert_allclose(found.boxes, [[10, 10, 30, 30], [40, 30, 44, 33]])  # keypoints' extent
    assert found.box_prompts().tolist() == [True, False]
    np.testing.assert_allclose(found.points, [[[15, 15], [28, 12]], [[40, 30], [44, 33]]])
    assert found.point_labels.tolist() == [[1, 0], [1, 1]]


# ---- JSONL and the prompt modes ------------------------------------------------------------------


@pytest.fixture
def mixed_jsonl(tmp_path) -> str:
    """a.jpg: object 0 has a box + a positive and a negative click, object 1 a box only;
    b.jpg: one point-only object with two positive clicks and a negative one."""
    return write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {
                "image": url("a.jpg"),
                "boxes": [[4, 4, 20, 30], [30, 10, 50, 20]],
                "points": [[[10, 10], [18, 28]], []],
                "point_labels": [[1, 0], []],
                "labels": ["tree", "shrub"],
                "scores": [0.5, None],
            },
            {"image": url("b.jpg"), "points": [[[5, 6], [15, 26], [9, 9]]], "point_labels": [[1, 1, 0]]},
        ],
    )


@pytest.mark.parametrize(
    ("mode", "box_prompt", "points", "labels"),
    [
        ("box", [True, True], None, None),
        (
            "point",
            [False, False],
            [[[10, 10], [18, 28]], [[40, 15], [0, 0]]],  # box without clicks -> its centre
            [[1, 0], [1, -1]],
        ),
        ("box+point", [True, True], [[[10, 10], [18, 28]], [[0, 0], [0, 0]]], [[1, 0], [-1, -1]]),
    ],
)
def test_jsonl_prompt_modes(mixed_jsonl, mode, box_prompt, points, labels):
    detector = prompter(mixed_jsonl, prompt_mode=mode)
    a = detect_one(detector, image("a.jpg"))
    np.testing.assert_allclose(a.boxes, [[4, 4, 20, 30], [30, 10, 50, 20]])  # the file's boxes, every mode
    assert a.phrases == ["tree", "shrub"] and a.box_scores[0] == 0.5 and math.isnan(a.box_scores[1])
    assert a.box_prompts().tolist() == box_prompt
    if points is None:
        assert a.points is None and not a.has_clicks
    else:
        np.testing.assert_allclose(a.points, points)
        assert a.point_labels.tolist() == labels

    b = detect_one(
        detector, image("b.jpg")
    )  # point-only: clicks in every mode, box = positive clicks' extent
    np.testing.assert_allclose(b.boxes, [[5, 6, 15, 26]])
    assert b.box_prompts().tolist() == [False] and b.phrases == ["object"]
    np.testing.assert_allclose(b.points, [[[5, 6], [15, 26], [9, 9]]])
    assert b.point_labels.tolist() == [[1, 1, 0]]
    counts = detector.describe()["annotation_counts"]
    assert (counts["objects"], counts["boxes"], counts["clicks"], counts["negative_clicks"]) == (3, 2, 5, 2)


def test_clicks_survive_the_detections_table(mixed_jsonl):
    detector = prompter(mixed_jsonl, prompt_mode="box+point")
    items = [detect_one(detector, image("a.jpg")), detect_one(detector, image("b.jpg"))]
    table = detections_table(items)
    assert table.column("point_labels").to_pylist() == [[1, 0], [], [1, 1, 0]]
    assert table.column("points").to_pylist()[2] == [5, 6, 15, 26, 9, 9]
    assert table.column("box_prompt").to_pylist() == [True, True, False]


# ---- matching ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match_on", "matched"),
    [
        ("url", {"a.jpg"}),
        ("image_id", {"b.jpg"}),
        ("file_name", {"a.jpg", "c.jpg"}),  # a.jpg's URL ends in its file name too
        ("auto", {"a.jpg", "b.jpg", "c.jpg"}),
    ],
)
def test_match_on(tmp_path, match_on, matched):
    """Row keys: a.jpg by URL, b.jpg by our image id, c.jpg by file name (another host's URL)."""
    source = write_jsonl(
        tmp_path / "keys.jsonl",
        [
            {"image": url("a.jpg"), "boxes": [[1, 1, 5, 5]]},
            {"image": image("b.jpg").image_id, "boxes": [[1, 1, 5, 5]]},
            {"image": "https://elsewhere.example.com/c.jpg?size=large", "boxes": [[1, 1, 5, 5]]},
            {"image": url("not-in-catalog.jpg"), "boxes": [[1, 1, 5, 5]]},
        ],
    )
    detector = prompter(source, match_on=match_on)
    names = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    found = detector.detect([image(n) for n in names], [], max_candidates=10)
    assert {n for n, c in zip(names, found, strict=True) if len(c)} == matched
    report = detector.match_report()
    assert report["images_seen"] == 4 and report["images_matched"] == len(matched)
    assert report["images_without_annotations"] == 4 - len(matched)
    assert report["file_images"] == 4 and report["file_images_unmatched"] == 4 - len(matched)
    assert url("not-in-catalog.jpg") in report["file_images_unmatched_examples"]


def test_coco_matches_on_file_name_without_folders_and_percent_decoding(tmp_path):
    source = write_coco(
        tmp_path / "names.json",
        [{"id": 3, "file_name": "train/a b.jpg", "width": W, "height": H}],
        [{"id": 1, "image_id": 3, "bbox": [1, 2, 3, 4], "category_id": 1}],
    )
    ours = PreparedImage("x", W, H, None, url="https://host/photos/a%20b.jpg")
    assert len(detect_one(prompter(source, match_on="file_name"), ours)) == 1
    assert len(detect_one(prompter(source, match_on="url"), ours)) == 0


def test_a_file_name_naming_two_images_is_an_error(tmp_path):
    source = write_jsonl(
        tmp_path / "dupes.jsonl",
        [
            {"image": "https://a.example/1/x.jpg", "boxes": []},
            {"image": "https://b.example/2/x.jpg", "boxes": []},
        ],
    )
    with pytest.raises(AnnotationError, match=r"file_name 'x.jpg': names 2 images \(line 1, line 2\)"):
        prompter(source, match_on="file_name")
    auto = prompter(source)  # auto: only an image that gets down to the file name fails, saying why
    assert len(detect_one(auto, PreparedImage("i", W, H, None, url="https://a.example/1/x.jpg"))) == 0
    with pytest.raises(AnnotationError, match="set match_on to a key that is unique"):
        detect_one(auto, PreparedImage("j", W, H, None, url="https://c.example/x.jpg"))


def test_max_candidates_cut_is_counted(tmp_path):
    source = write_jsonl(
        tmp_path / "many.jsonl",
        [
            {
                "image": url("a.jpg"),
                "boxes": [[i, i, i + 5, i + 5] for i in range(5)],
                "scores": [0.1, 0.5, 0.3, 0.9, 0.2],
            }
        ],
    )
    detector = prompter(source)
    found = detect_one(detector, image("a.jpg"), max_candidates=2)
    np.testing.assert_allclose(found.box_scores, [0.9, 0.5])
    assert found.query_indices.tolist() == [3, 1]
    assert detector.match_report()["candidates_cut"] == 3


# ---- sizes and the image border ------------------------------------------------------------------


def test_size_mismatch_is_an_error_naming_the_cause(tmp_path):
    source = write_coco(
        tmp_path / "sizes.json",
        [
            coco_image(1, "rotated.jpg", width=H, height=W),
            coco_image(2, "big.jpg", width=2 * W, height=2 * H),
        ],
        [],
    )
    detector = prompter(source)
    prepared = detector.prepare("r", jpeg())  # header only: the stored size
    assert (prepared.width, prepared.height, prepared.pixels) == (W, H, None)
    with pytest.raises(AnnotationError, match=r"stored as 64x48, but .* gives 48x64 .* swapped.*EXIF"):
        detect_one(detector, image("rotated.jpg"))
    with pytest.raises(AnnotationError, match=r"gives 128x96 .* is 0.5x the annotated one.*max_side"):
        detect_one(detector, image("big.jpg"))


def test_border_crossing_boxes_are_clipped_and_counted(tmp_path):
    coco = write_coco(
        tmp_path / "clip.json",
        [coco_image(1, "a.jpg")],
        [{"id": 1, "image_id": 1, "bbox": [-5, 40, 20, 20], "category_id": 1}],
    )
    detector = prompter(coco)
    assert detector.describe()["annotation_counts"]["boxes_clipped"] == 1  # known size: at load time
    np.testing.assert_allclose(detect_one(detector, image("a.jpg")).boxes, [[0, 40, 15, 48]])

    jsonl = write_jsonl(  # no size in the file: checked against the stored image when it is read
        tmp_path / "clip.jsonl",
        [
            {"image": url("a.jpg"), "boxes": [[50, 10, 90, 20]]},
            {"image": url("b.jpg"), "points": [[[70, 5]]]},
        ],
    )
    detector = prompter(jsonl)
    np.testing.assert_allclose(detect_one(detector, image("a.jpg")).boxes, [[50, 10, 64, 20]])
    assert detector.match_report()["boxes_clipped"] == 1
    with pytest.raises(
        AnnotationError, match=r"line 2, object 0: click \(70, 5\) lies outside the 64x48 image"
    ):
        detect_one(detector, image("b.jpg"))


# ---- malformed files -----------------------------------------------------------------------------


def jsonl_case(*rows):
    return ("bad.jsonl", "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))


def coco_case(annotations, images=None, categories=None):
    images = [coco_image(1, "a.jpg")] if images is None else images
    categories = [{"id": 1, "name": "tree"}] if categories is None else categories
    return ("bad.json", json.dumps({"images": images, "annotations": annotations, "categories": categories}))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (jsonl_case({"image": "a", "boxes": []}, '{"image": "b", "boxes": [}'), r"line 2: invalid JSON"),
        (
            jsonl_case({"image": "a", "boxes": [[1, 2, 3]]}),
            r"line 1, object 0: box must be 4 numbers .* got 3",
        ),
        (jsonl_case({"image": "a", "boxes": [[10, 2, 3, 8]]}), r"line 1, object 0: box width must be > 0"),
        (
            jsonl_case({"image": "a", "points": [[[1, 2]]], "point_labels": [[2]]}),
            r"line 1, object 0: point labels must be 1 \(object\) or 0 \(background\), got 2",
        ),
        (
            jsonl_case({"image": "a", "points": [[[1, 2], [3, 4]]], "point_labels": [[1]]}),
            r"line 1, object 0: 2 points but 1 point_labels",
        ),
        (
            jsonl_case({"image": "a", "boxes": [[1, 1, 4, 4]], "points": [[[1, 2]], [[3, 3]]]}),
            r'line 1: 2 "points" but 1 objects',
        ),
        (jsonl_case({"image": "a", "points": [[[1, 2]]], "point_labels": [[0]]}), r"at least one positive"),
        (jsonl_case({"image": "a", "box": [[1, 1, 4, 4]]}), r"line 1: unknown keys \['box'\]"),
        (jsonl_case({"boxes": []}), r'line 1: "image" .* is required'),
        (jsonl_case({"image": "a"}, {"image": "a"}), r"line 2: image 'a' already given on line 1"),
        (
            jsonl_case({"image": "a", "boxes": [[1, 1, 4, 4]], "scores": ["high"]}),
            r"score must be a finite number",
        ),
        (
            coco_case([{"id": 17, "image_id": 1, "bbox": [1, 2, 3]}]),
            r"annotation id 17: bbox must be 4 numbers",
        ),
        (
            coco_case([{"id": 18, "image_id": 1, "bbox": [1, 2, -3, 4]}]),
            r"annotation id 18: bbox width must be > 0",
        ),
        (
            coco_case([{"id": 19, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 5}]),
            r"unknown category_id 5",
        ),
        (
            coco_case([{"id": 20, "image_id": 9, "bbox": [1, 2, 3, 4]}]),
            r"annotation id 20: image_id 9 is not in",
        ),
        (coco_case([{"id": 21, "image_id": 1, "bbox": [70, 50, 3, 4]}]), r"lies outside the 64x48 image"),
        (coco_case([{"id": 22, "image_id": 1, "points": [[1, 1]], "point_labels": [-1]}]), r"got -1"),
        (coco_case([{"id": 23, "image_id": 1}]), r"annotation id 23: has neither a box nor clicks"),
        (
            coco_case([], images=[coco_image(1, "a.jpg"), coco_image(1, "b.jpg")]),
            r"image id 1: appears twice",
        ),
        (("bad.json", '{"images": [], \n "annotations": [,]}'), r"line 2: invalid JSON"),
        (("bad.csv", "image,x"), r"unknown format \.csv; use \.json \(COCO\) or \.jsonl"),
    ],
)
def test_malformed_files_fail_at_load_naming_file_place_and_problem(tmp_path, case, message):
    name, text = case
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message) as raised:
        prompter(str(path))
    assert str(path) in str(raised.value)
    assert isinstance(raised.value, ModelConfigError)  # workers report it as configuration: no retries


def test_many_problems_are_listed_up_to_ten(tmp_path):
    rows = [{"image": f"i{n}", "boxes": [[5, 5, 1, 1]]} for n in range(13)]
    with pytest.raises(AnnotationError) as raised:
        prompter(write_jsonl(tmp_path / "many.jsonl", rows))
    text = str(raised.value)
    assert "13 problem(s)" in text and "line 10, object 0" in text and "line 11," not in text
    assert text.endswith("... and 3 more")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AnnotationError, match="annotations file not found: .*nope.jsonl"):
        prompter(str(tmp_path / "nope.jsonl"))


# ---- identity and S3 -----------------------------------------------------------------------------


def test_identity_follows_the_content_not_the_path(tmp_path):
    rows = [{"image": url("a.jpg"), "boxes": [[1, 1, 5, 5]]}]
    first = prompter(write_jsonl(tmp_path / "one.jsonl", rows)).describe()
    moved = prompter(write_jsonl(tmp_path / "two.jsonl", rows)).describe()
    rows[0]["boxes"][0][2] = 6
    edited = prompter(write_jsonl(tmp_path / "one.jsonl", rows)).describe()
    refs, settings = [ImageRef("x", W, H, "sha")], DetectionSettings()
    fingerprint = lambda identity: detection_fingerprint(refs, settings, identity)  # noqa: E731
    assert fingerprint(first) == fingerprint(moved)
    assert fingerprint(first) != fingerprint(edited)
    assert fingerprint(first) != fingerprint(
        prompter(str(tmp_path / "one.jsonl"), prompt_mode="point").describe()
    )


def test_reads_an_s3_file(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    local = write_jsonl(
        tmp_path / "boxes.jsonl", [{"image": url("a.jpg"), "boxes": [[1, 2, 30, 40]], "labels": ["tree"]}]
    )
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="labels/boxes.jsonl", Body=Path(local).read_bytes())

    detector = load_annotations(
        DetectorSpec(backend="annotations", variant="", annotations=f"s3://{s3_bucket}/labels/boxes.jsonl")
    )
    assert detector.describe()["checkpoint_sha256"] == prompter(local).describe()["checkpoint_sha256"]
    found = detect_one(detector, image("a.jpg"))
    assert found.phrases == ["tree"] and found.boxes.tolist() == [[1, 2, 30, 40]]
    with pytest.raises(
        AnnotationError, match=f"annotations file not found: s3://{s3_bucket}/labels/missing.jsonl"
    ):
        load_annotations(
            DetectorSpec(
                backend="annotations", variant="", annotations=f"s3://{s3_bucket}/labels/missing.jsonl"
            )
        )
