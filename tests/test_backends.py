"""The seeds' flows with the real backends (tiny architectures, random weights: SMOKE RUNS, no quality
claim), each as asset materializations through the model workers and as `pseudolabel segment` commands:

- text -> OWLv2 -> a light SAM (EdgeTAM)
- prompt-free DINOv2 saliency -> SAM2 clicks -> masks + the 3-panel picture over the attention map
- COCO boxes -> SAM2 masks -> pseudo-labels with polygons
- a box + a negative click (JSONL) -> SAM2 refined mask
SAM 3 runs in its own environment: tests/test_sam3_suite.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli import pseudolabel
from dagster import DagsterInstance, materialize
from images import random_jpeg
from worker_helpers import run, shard_metadata, shards

from assets.common import SHARDS_PARTITIONS_NAME
from assets.detections import detections
from assets.masks import masks
from assets.pseudo_labels import PseudoLabelsConfig, pseudo_labels
from pseudolabel import layout
from pseudolabel.models.interfaces import Candidates
from pseudolabel.rle import decode_rle
from pseudolabel.storage import LocalObjectStore, read_parquet
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.thresholds import ThresholdsResource
from resources.workers import LocalModelWorkers

REPO = Path(__file__).resolve().parents[1]
RANDOM = {"checkpoint": "random", "tiny": True, "device": "cpu"}
# Random weights make low scores: keep every mask so the flow reaches the label files.
KEEP_ALL = """version: 1
box_score: 0.0
text_score: 0.0
mask_score: 0.0
min_mask_area_fraction: 0.0
max_box_coverage: 1.0
nms_iou: 1.0
max_instances_per_image: 100
pick_policy: all
"""


@pytest.fixture()
def shard(tmp_path, worker_python):
    store = LocalObjectStore(tmp_path / "data")
    (name,) = shards(store, 1, images=2)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])
        yield store, instance, name


def stored(store, name) -> list[Candidates]:
    found = Candidates.from_tables(
        read_parquet(store, layout.detections(name)), read_parquet(store, layout.detection_images(name))
    )
    masks_table = read_parquet(store, layout.masks(name)).to_pandas()
    assert len(masks_table) == sum(len(c) for c in found)
    for row in masks_table.itertuples():  # every mask decodes at its image's size to its stated area
        assert int(decode_rle(row.rle_counts, row.height, row.width).sum()) == row.mask_area
    return found


def test_text_owlv2_then_the_light_segmenter_as_assets(shard):
    store, instance, name = shard
    detector = DetectorResource(backend="owlv2", **RANDOM)
    segmenter = SegmenterResource(backend="edgetam", **RANDOM)
    settings = {"prompt": "plant . flower .", "box_floor": 0.0, "text_floor": 0.0, "max_candidates": 5}
    result = run(
        store,
        [detections, masks],
        instance,
        detector=detector,
        segmenter=segmenter,
        shard=name,
        settings=settings,
    )
    assert result.success
    found = stored(store, name)
    assert all(len(c) == 5 for c in found)
    assert {p for c in found for p in c.phrases} <= {"plant", "flower"}
    detected, segmented = (
        shard_metadata(instance, "detections")[name],
        shard_metadata(instance, "masks")[name],
    )
    assert (detected["backend"], detected["smoke_run"]) == ("owlv2", True)
    assert (segmented["backend"], segmented["smoke_run"]) == ("edgetam", True)


def test_prompt_free_dinov2_clicks_then_sam2_as_assets(shard):
    store, instance, name = shard
    detector = DetectorResource(backend="dinov2_saliency", prompt_mode="point", num_objects=3, **RANDOM)
    segmenter = SegmenterResource(backend="sam2", variant="tiny", **RANDOM)
    result = run(
        store, [detections, masks], instance, detector=detector, segmenter=segmenter, shard=name,
        settings={"box_floor": 0.0},
    )  # fmt: skip
    assert result.success
    found = stored(store, name)
    assert sum(len(c) for c in found) > 0
    for c in found:
        assert not c.box_prompts().any() and (c.point_labels == 1).all()  # one positive click each
        assert np.isnan(c.text_scores).all()  # a prompt-free backend has no text score


def test_coco_boxes_to_masks_and_polygons_as_assets(shard, tmp_path):
    store, instance, name = shard
    ids = sorted(r["image_id"] for r in read_parquet(store, layout.image_index(name)).to_pylist())
    coco = {
        "images": [{"id": n + 1, "file_name": f"{image_id}.jpg", "width": 96, "height": 64} for n, image_id in enumerate(ids)],
        "categories": [{"id": 1, "name": "tree"}, {"id": 2, "name": "bush"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 8, 30, 40]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 20, 30, 30]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 60, 50]},
        ],
    }  # fmt: skip
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    (tmp_path / "keep_all.yaml").write_text(KEEP_ALL)
    detector = DetectorResource(
        backend="annotations", annotations=str(tmp_path / "boxes.json"), match_on="file_name"
    )
    segmenter = SegmenterResource(backend="sam2", variant="tiny", **RANDOM)
    result = run(store, [detections, masks], instance, detector=detector, segmenter=segmenter, shard=name)
    assert result.success
    found = stored(store, name)
    assert [len(c) for c in found] == [2, 1]
    assert found[0].phrases == ["tree", "bush"]
    np.testing.assert_allclose(found[0].boxes, [[10, 8, 40, 48], [50, 20, 80, 50]])
    labelled = materialize(
        [pseudo_labels],
        partition_key=name,
        instance=instance,
        run_config={
            "ops": {"pseudo_labels": {"config": PseudoLabelsConfig(write_polygons=True).model_dump()}}
        },
        resources={
            "storage": LocalStorageResource(root=str(store.root)),
            "thresholds": ThresholdsResource(path=str(tmp_path / "keep_all.yaml")),
        },
    )
    assert labelled.success
    labels = read_parquet(store, layout.pseudo_labels(name)).to_pandas()
    assert len(labels) == 3  # every annotated box became a label
    polygons = json.loads(store.get_bytes(layout.pseudo_labels_polygons(name)))
    assert len(polygons["annotations"]) == int(
        (labels["mask_area"] > 0).sum()
    )  # an empty mask has no outline
    assert all(isinstance(a["segmentation"], list) for a in polygons["annotations"])
    meta = shard_metadata(instance, "pseudo_labels")[name]
    assert meta["text_score_not_produced"] == 3 and meta["box_score_not_produced"] == 3
    matched = shard_metadata(instance, "detections")[name]["annotations_matched"]
    assert (matched["images_matched"], matched["file_images_unmatched"]) == (2, 0)


def readme_segment_lines() -> list[str]:
    """The command lines of the README's `pseudolabel segment` block."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("**`pseudolabel segment`**") :]
    block = block[block.index("```bash") + len("```bash") : block.index("```", block.index("```bash") + 7)]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_the_readme_segment_lines_run_offline(tmp_path, worker_python, sam3_worker_python):
    """Each README line as written, plus `--random-weights` where it is missing (no weights here): text
    (Grounding DINO, OWLv2 + EdgeTAM, SAM 3), --auto, COCO --boxes with polygons, --points with a
    negative click. Every output is a labelled smoke run."""
    (tmp_path / "photos").mkdir()
    for n in range(2):
        (tmp_path / "photos" / f"p{n}.jpg").write_bytes(random_jpeg(160, 120, seed=10 + n))
    (tmp_path / "photo.jpg").write_bytes(random_jpeg(160, 120, seed=5))
    coco = {
        "images": [{"id": 1, "file_name": "photo.jpg", "width": 160, "height": 120}],
        "categories": [{"id": 1, "name": "tree"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [20, 20, 70, 80]}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    clicks = {
        "image": "photo.jpg",
        "boxes": [[20, 20, 90, 100]],
        "points": [[[50, 60], [80, 30]]],
        "point_labels": [[1, 0]],
    }
    (tmp_path / "clicks.jsonl").write_text(json.dumps(clicks) + "\n")
    lines = readme_segment_lines()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert len(lines) >= 7 and all(line.startswith("pseudolabel segment ") for line in lines)
    for line in lines:
        command = line if "--random-weights" in line else f"{line} --random-weights"
        if "--prompt" in command and "--detector sam3" not in command:
            command += " --all-candidates --box-floor 0"  # random scores: keep something to look at
        out = tmp_path / shlex.split(command)[shlex.split(command).index("--out") + 1]
        shutil.rmtree(out, ignore_errors=True)
        done = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-3000:])
        assert "SMOKE RUN" in done.stdout, command
        summaries = [json.loads(p.read_text()) for p in sorted(out.glob("*_summary.json"))]
        assert len(summaries) == (2 if "photos/" in command else 1), command
        for summary in summaries:
            assert summary["smoke_run"] is True and summary["kept"] == len(summary["masks"]), (
                command,
                summary,
            )
            assert (out / summary["visualization"]).stat().st_size > 0
        first = summaries[0]
        record = (
            json.loads((out / first["masks"][0]).with_suffix(".json").read_text()) if first["masks"] else {}
        )
        if "--points" in command:
            assert record["prompt"]["points"] == [[50.0, 60.0], [80.0, 30.0]]
            assert record["prompt"]["point_labels"] == [1, 0] and record["prompt"]["box"] is True
        if "--boxes" in command:
            assert record["polygons"] and record["box"] == [20.0, 20.0, 90.0, 100.0]
        if "--auto" in command:
            assert first["backends"]["detector"]["backend"] == "dinov2_saliency"
        if "--detector sam3" in command:
            assert first["backends"]["segmenter"] == {"backend": "detector"}


def test_switching_backend_reruns_detections_and_the_same_backend_skips(tmp_path):
    """The detector's identity is in the stage fingerprint: a shard detected by the stand-in is re-detected
    by the annotations backend, and a second identical run reuses it. Editing the annotation file re-runs
    it again. (Both backends need no model stack: no worker environment.)"""
    store = LocalObjectStore(tmp_path / "data")
    (name,) = shards(store, 1, images=2)
    ids = sorted(r["image_id"] for r in read_parquet(store, layout.image_index(name)).to_pylist())
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text(json.dumps({"image": ids[0], "boxes": [[1, 2, 30, 40]]}) + "\n")
    annotations = DetectorResource(backend="annotations", annotations=str(boxes), match_on="image_id")
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [name])

        def detect(detector) -> dict:
            result = materialize(
                [detections],
                partition_key=name,
                instance=instance,
                resources={
                    "storage": LocalStorageResource(root=str(store.root)),
                    "detector": detector,
                    "stage_settings": StageSettingsResource(),
                    "model_workers": LocalModelWorkers(),
                },
            )
            assert result.success
            return shard_metadata(instance, "detections")[name]

        assert detect(DetectorResource(backend="fake"))["skipped"] is False
        first = detect(annotations)
        assert first["skipped"] is False and first["backend"] == "annotations" and first["candidates"] == 1
        assert detect(annotations)["skipped"] is True
        boxes.write_text(json.dumps({"image": ids[0], "boxes": [[1, 2, 30, 40], [5, 5, 9, 9]]}) + "\n")
        again = detect(annotations)
        assert again["skipped"] is False and again["candidates"] == 2


def test_a_box_and_a_negative_click_refine_the_mask_as_assets(shard, tmp_path):
    """JSONL box + clicks: with prompt_mode box the clicks are ignored, with box+point they reach SAM2 and
    change the mask of the same box (random weights: a change, not a better mask)."""
    store, instance, name = shard
    ids = sorted(r["image_id"] for r in read_parquet(store, layout.image_index(name)).to_pylist())
    row = {
        "image": ids[0],
        "boxes": [[10, 8, 80, 56]],
        "points": [[[40, 30], [70, 15]]],
        "point_labels": [[1, 0]],
    }
    (tmp_path / "clicks.jsonl").write_text(json.dumps(row) + "\n")
    segmenter = SegmenterResource(backend="sam2", variant="tiny", **RANDOM)
    masks_by_mode = {}
    for mode in ("box", "box+point"):
        detector = DetectorResource(
            backend="annotations",
            annotations=str(tmp_path / "clicks.jsonl"),
            match_on="image_id",
            prompt_mode=mode,
        )
        assert run(
            store, [detections, masks], instance, detector=detector, segmenter=segmenter, shard=name
        ).success
        found = stored(store, name)
        assert [len(c) for c in found] == [1, 0]
        if mode == "box":
            assert not found[0].has_clicks
        else:
            np.testing.assert_array_equal(found[0].point_labels, [[1, 0]])
            np.testing.assert_array_equal(found[0].points, [[[40, 30], [70, 15]]])
        row = read_parquet(store, layout.masks(name)).to_pylist()[0]
        masks_by_mode[mode] = decode_rle(row["rle_counts"], row["height"], row["width"])
    assert (masks_by_mode["box"] != masks_by_mode["box+point"]).any()


def test_segment_names_a_missing_checkpoint_without_a_traceback(tmp_path, worker_python):
    (tmp_path / "photo.jpg").write_bytes(random_jpeg(64, 48))
    (tmp_path / "boxes.jsonl").write_text(
        json.dumps({"image": "photo.jpg", "boxes": [[5, 5, 30, 30]]}) + "\n"
    )
    done = pseudolabel(
        "segment", "photo.jpg", "--boxes", "boxes.jsonl", "--segmenter-checkpoint", str(tmp_path / "missing.pt"),
        "--device", "cpu", "--out", "out", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "checkpoint not found at local path" in done.stderr and str(tmp_path / "missing.pt") in done.stderr
    assert "Traceback" not in done.stderr
