"""`pseudolabel segment` as a user runs it (the console script), with the stand-in backends.

The real backends run the same command in tests/test_backends.py; here the outputs' contract: files per
image, sizes in the upright frame, scores and backends in the JSON, counts that add up, the 3-panel
picture, clear errors, and a re-run that leaves nothing stale.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import piexif
from cli import pseudolabel
from images import random_jpeg
from PIL import Image

from pseudolabel.rle import decode_rle


def rotated_jpeg(width: int, height: int) -> bytes:
    """Stored ``width`` x ``height`` with EXIF orientation 6: upright it is ``height`` x ``width``."""
    image = Image.open(io.BytesIO(random_jpeg(width, height, seed=3)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=piexif.dump({"0th": {piexif.ImageIFD.Orientation: 6}}))
    return buffer.getvalue()


def test_a_text_prompt_writes_masks_json_a_three_panel_picture_and_a_summary(tmp_path):
    (tmp_path / "turned.jpg").write_bytes(rotated_jpeg(240, 120))
    (tmp_path / "plain.jpg").write_bytes(random_jpeg(160, 120, seed=1))
    done = pseudolabel(
        "segment", "turned.jpg", "plain.jpg", "--prompt", "plant . flower .",
        "--detector", "fake", "--segmenter", "fake", "--out", "out", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[1/2] turned.jpg" in done.stdout and "[2/2] plain.jpg" in done.stdout
    assert "done: 2 images" in done.stdout
    out = tmp_path / "out"
    for name, upright in (("turned", (120, 240)), ("plain", (160, 120))):
        summary = json.loads((out / f"{name}_summary.json").read_text())
        assert (summary["width"], summary["height"]) == upright
        assert summary["candidates"] == summary["kept"] + sum(summary["rejected"].values())
        assert summary["kept"] == len(summary["masks"]) > 0
        assert summary["backends"]["detector"]["backend"] == "fake"
        assert summary["prompt"] == "plant . flower ." and summary["thresholds"].endswith("thresholds.yaml")
        for mask_name in summary["masks"]:
            mask = np.asarray(Image.open(out / mask_name))
            assert mask.shape == (upright[1], upright[0]) and set(np.unique(mask)) <= {0, 255}
            record = json.loads((out / mask_name).with_suffix(".json").read_text())
            assert record["area"] == int((mask > 0).sum())
            x0, y0, x1, y1 = record["box"]
            assert 0 <= x0 < x1 <= upright[0] and 0 <= y0 < y1 <= upright[1]
            assert set(record["scores"]) == {"box_score", "text_score", "mask_score"}
            assert record["prompt"]["text"] == "plant . flower ." and record["prompt"]["box"] is True
            assert record["prompt"]["phrase"] in ("plant", "flower")
            assert record["backends"]["segmenter"]["backend"] == "fake"
        picture = Image.open(out / summary["visualization"])
        assert picture.format == "JPEG"
        # three panels of the upright image (small images are not scaled) under a title strip
        assert picture.size == (3 * upright[0] + 2 * 6, upright[1] + 18)


def test_every_candidate_with_polygons_and_a_rerun_leaves_nothing_stale(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(random_jpeg(200, 150, seed=2))  # 3 fake candidates
    args = (
        "segment",
        "photo.jpg",
        "--prompt",
        "plant . flower . tree .",
        "--detector",
        "fake",
        "--segmenter",
        "fake",
    )
    everything = pseudolabel(*args, "--all-candidates", "--polygons", "--out", "out", cwd=tmp_path)
    assert everything.returncode == 0, everything.stderr
    summary = json.loads((tmp_path / "out" / "photo_summary.json").read_text())
    assert summary["kept"] == summary["candidates"] > 1 and summary["rejected"] == {}
    assert summary["thresholds"].startswith("not applied")
    record = json.loads((tmp_path / "out" / "photo_masks" / "mask_000.json").read_text())
    assert record["polygons"] and all(len(polygon) >= 6 for polygon in record["polygons"])

    thresholded = pseudolabel(*args, "--out", "out", cwd=tmp_path)
    assert thresholded.returncode == 0, thresholded.stderr
    summary = json.loads((tmp_path / "out" / "photo_summary.json").read_text())
    assert summary["kept"] < summary["candidates"]
    on_disk = sorted(p.name for p in (tmp_path / "out" / "photo_masks").glob("*.png"))
    assert on_disk == sorted(Path(m).name for m in summary["masks"])


def test_bad_arguments_fail_with_a_message_before_any_model_loads(tmp_path):
    (tmp_path / "a.jpg").write_bytes(random_jpeg(64, 64))
    missing = pseudolabel("segment", "a.jpg", "nope.jpg", "--prompt", "x .", "--out", "o", cwd=tmp_path)
    assert missing.returncode == 2 and "no such image file: nope.jpg" in missing.stderr
    wrong = pseudolabel("segment", "a.jpg", "--auto", "--detector", "owlv2", "--out", "o", cwd=tmp_path)
    assert wrong.returncode == 2 and "--detector owlv2 does not go with --auto" in wrong.stderr
    mixed = pseudolabel(
        "segment", "a.jpg", "--prompt", "x .", "--detector", "sam3", "--segmenter", "sam2", "--out", "o", cwd=tmp_path
    )  # fmt: skip
    assert mixed.returncode == 2 and "different worker environments" in mixed.stderr
    no_source = pseudolabel("segment", "a.jpg", "--out", "o", cwd=tmp_path)
    assert (
        no_source.returncode == 2
        and "one of the arguments --prompt --auto --boxes --points" in no_source.stderr
    )
    assert not (tmp_path / "o").exists()


def test_masks_decode_to_what_the_json_says(tmp_path):
    """The PNG is the RLE the segmenter produced: same pixels as decoding the stored counts."""
    (tmp_path / "a.jpg").write_bytes(random_jpeg(96, 64, seed=4))
    done = pseudolabel(
        "segment", "a.jpg", "--prompt", "plant .", "--detector", "fake", "--segmenter", "fake",
        "--all-candidates", "--out", "out", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from pseudolabel.images.normalize import normalize_image
    from pseudolabel.models.loading import DetectorSpec, SegmenterSpec
    from pseudolabel.models.stages import (
        DetectionSettings,
        ImageRef,
        SegmentationSettings,
        run_detection,
        run_segmentation,
    )
    from pseudolabel.testing.models import FakeDetector, FakeSegmenter

    data = normalize_image((tmp_path / "a.jpg").read_bytes()).jpeg  # what the models read
    detector = FakeDetector.from_spec(DetectorSpec(backend="fake", batch_size=4))
    segmenter = FakeSegmenter.from_spec(SegmenterSpec(backend="fake", batch_size=4))
    found = run_detection(
        [ImageRef("a", 96, 64)], lambda _: data, detector, DetectionSettings(prompt="plant .")
    ).images
    (masks,) = run_segmentation(found, lambda _: data, segmenter, SegmentationSettings()).images
    for n in range(len(masks)):
        png = np.asarray(Image.open(tmp_path / "out" / "a_masks" / f"mask_{n:03d}.png")) > 0
        np.testing.assert_array_equal(png, decode_rle(masks.masks.counts[n], 64, 96))
