"""SAM 3 through the assets: the detections stage (tiny random SAM 3 in its own worker environment) stores
its masks, and the masks stage with the segmenter backend "detector" takes them without a model. After a
detector that makes no masks, that backend fails clearly. Random weights: a smoke run, no quality claim."""

from __future__ import annotations

import numpy as np
import pytest
from dagster import DagsterEventType, DagsterInstance
from worker_helpers import run, shards

from assets.common import SHARDS_PARTITIONS_NAME
from assets.detections import detections
from assets.masks import masks
from pseudolabel import layout, schemas
from pseudolabel.fingerprint import table_fingerprint
from pseudolabel.models.interfaces import Candidates
from pseudolabel.models.loading import ModelConfigError, SegmenterSpec, load_segmenter
from pseudolabel.rle import decode_rle
from pseudolabel.storage import LocalObjectStore, read_parquet
from resources.models import DetectorResource, SegmenterResource

SAM3 = DetectorResource(backend="sam3", checkpoint="random", tiny=True, batch_size=4, num_workers=2)
DETECTOR_MASKS = SegmenterResource(backend="detector")
SETTINGS = {"prompt": "plant . flower .", "max_candidates": 12}


def _metadata(result, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _failure(result) -> str:
    (failure,) = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    return failure.step_failure_data.user_failure_data.description


def test_sam3_masks_come_from_the_detections_stage(tmp_path, sam3_worker_python):
    store = LocalObjectStore(tmp_path / "data")
    (shard,) = shards(store, 1, images=3)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [shard])
        result = run(
            store,
            [detections, masks],
            instance,
            detector=SAM3,
            segmenter=DETECTOR_MASKS,
            shard=shard,
            settings=SETTINGS,
        )
        assert result.success
        found = _metadata(result, "detections")
        assert found["backend"] == "sam3" and found["smoke_run"] and found["detector_masks"]
        made = _metadata(result, "masks")
        assert made["backend"] == "detector" and made["masks_from"].endswith(f"{shard}.masks.parquet")
        assert made["candidates"] == found["candidates"] == 3 * 12

        dets = read_parquet(store, layout.detections(shard))
        stored = read_parquet(store, layout.detection_masks(shard))
        copied = read_parquet(store, layout.masks(shard))
        assert copied.schema.remove_metadata() == schemas.MASKS
        assert copied.equals(stored)  # the same rows; only the fingerprint in the metadata differs
        assert table_fingerprint(stored) == table_fingerprint(dets) != table_fingerprint(copied)
        assert copied.select(["image_id", "candidate_id"]).equals(dets.select(["image_id", "candidate_id"]))
        sizes = {
            r["image_id"]: (r["height"], r["width"])
            for r in read_parquet(store, layout.image_index(shard)).to_pylist()
        }
        for row in copied.to_pylist():
            assert (row["height"], row["width"]) == sizes[row["image_id"]]
            assert decode_rle(row["rle_counts"], row["height"], row["width"]).sum() == row["mask_area"]
        scores = dets.column("box_score").to_numpy()
        np.testing.assert_array_equal(copied.column("mask_score").to_numpy(), scores)  # no IoU head
        assert ((scores > 0.05) & (scores <= 1)).all()

        # A detector that makes no masks: its detections delete the stale masks; "detector" fails clearly.
        result = run(
            store,
            [detections, masks],
            instance,
            detector=DetectorResource(backend="fake"),
            segmenter=DETECTOR_MASKS,
            shard=shard,
        )
        assert not result.success
        assert not store.exists(layout.detection_masks(shard))
        message = _failure(result)
        assert "segmenter backend 'detector' needs a detector that makes masks, e.g. sam3" in message
        assert "stored no masks" in message and "Retrying will not help" in message


def test_detector_masks_segmenter_passes_masks_through_and_refuses_boxes_alone():
    segmenter = load_segmenter(SegmenterSpec(backend="detector"))
    assert segmenter.describe()["backend"] == "detector"
    empty = Candidates.empty("a", 8, 6)
    with_masks = empty.with_no_masks(1)
    assert segmenter.segment([], [with_masks], multimask=False) == [with_masks]
    with pytest.raises(ModelConfigError, match="needs a detector that makes masks.*image a"):
        segmenter.segment([], [empty], multimask=False)
