"""The detections and masks assets end to end on a temporary local store (fake and tiny real models)."""

from __future__ import annotations

import base64
import re
import threading

import numpy as np
import pytest
from dagster import DagsterInstance, materialize
from images import write_image_shard

from assets.common import SHARDS_PARTITIONS_NAME
from assets.detections import detections
from assets.masks import masks
from pseudolabel import layout, schemas
from pseudolabel.models.stages import ok_images, prefetched_batches
from pseudolabel.rle import decode_rle
from pseudolabel.storage import LocalObjectStore, read_parquet
from resources.models import DetectorResource, SegmenterResource, StageSettingsResource
from resources.storage import LocalStorageResource
from resources.workers import LocalModelWorkers

SHARD = "shard-00000"
SIZES = [(160, 120), (96, 128), (200, 100), (64, 64), (120, 90), (80, 140)]


@pytest.fixture()
def shard_store(tmp_path):
    """A store holding one shard: 6 "ok" JPEGs of mixed sizes + 1 quarantined row, and its IMAGE_INDEX."""
    store = LocalObjectStore(tmp_path / "data")
    write_image_shard(store, SHARD, SIZES, quarantined=1)
    return store


def _materialize(store, detector, segmenter, *, det_config=None, mask_config=None):
    """``det_config`` / ``mask_config`` mix op config (force) and stage settings (the
    ``stage_settings`` resource: prompt, floors, max_candidates, multimask)."""
    given = {**(det_config or {}), **(mask_config or {})}
    settings = {k: v for k, v in given.items() if k in StageSettingsResource.model_fields}
    det_config = {k: v for k, v in (det_config or {}).items() if k not in settings}
    mask_config = {k: v for k, v in (mask_config or {}).items() if k not in settings}
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [SHARD])
    return materialize(
        [detections, masks],
        partition_key=SHARD,
        instance=instance,
        resources={
            "storage": LocalStorageResource(root=str(store.root)),
            "detector": detector,
            "segmenter": segmenter,
            "stage_settings": StageSettingsResource(**settings),
            "model_workers": LocalModelWorkers(),
        },
        run_config={
            "ops": {"detections": {"config": det_config or {}}, "masks": {"config": mask_config or {}}}
        },
    )


def _metadata(result, asset_name):
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == asset_name]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def _files(store):
    return {
        key: store.get_bytes(key)
        for key in (layout.detections(SHARD), layout.detection_images(SHARD), layout.masks(SHARD))
    }


def _check_tables(store):
    dets = read_parquet(store, layout.detections(SHARD))
    images = read_parquet(store, layout.detection_images(SHARD))
    mask_table = read_parquet(store, layout.masks(SHARD))
    assert dets.schema.remove_metadata() == schemas.DETECTIONS
    assert images.schema.remove_metadata() == schemas.DETECTION_IMAGES
    assert mask_table.schema.remove_metadata() == schemas.MASKS
    # Only the "ok" images, each recorded once with its original size, zero-candidate ones included.
    assert images.column("image_id").to_pylist() == [f"{i:016x}" for i in range(len(SIZES))]
    assert (
        list(zip(images.column("width").to_pylist(), images.column("height").to_pylist(), strict=True))
        == SIZES
    )
    det = dets.to_pandas()
    counts = det.groupby("image_id").size().to_dict()
    for row in images.to_pylist():
        assert counts.get(row["image_id"], 0) == row["num_candidates"]
    for _, group in det.groupby("image_id"):
        assert group["candidate_id"].tolist() == list(range(len(group)))
        assert np.all(np.diff(group["box_score"].to_numpy()) <= 0)  # sorted by score
        assert group["query_index"].is_unique  # the detector's output order, one query per box
    # One mask per candidate, same keys, RLE at the original size.
    masks_df = mask_table.to_pandas()
    assert (
        masks_df[["image_id", "candidate_id"]].values.tolist()
        == det[["image_id", "candidate_id"]].values.tolist()
    )
    sizes = {row["image_id"]: (row["height"], row["width"]) for row in images.to_pylist()}
    for row in masks_df.itertuples():
        assert (row.height, row.width) == sizes[row.image_id]
        assert decode_rle(row.rle_counts, row.height, row.width).sum() == row.mask_area
    return det, images.to_pandas(), masks_df


def _preview_bytes(markdown: str) -> bytes:
    match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", markdown)
    assert match, markdown[:100]
    return base64.b64decode(match.group(1))


def test_fake_chain_writes_contracts_and_metadata(shard_store):
    result = _materialize(shard_store, DetectorResource(backend="fake"), SegmenterResource(backend="fake"))
    assert result.success
    det, images, masks_df = _check_tables(shard_store)
    assert len(det) > 0 and (images["num_candidates"] == 0).any()  # both kinds of images present
    # The stored query (detector output) order is not the score order on some image.
    assert any(not g["query_index"].is_monotonic_increasing for _, g in det.groupby("image_id"))

    meta = _metadata(result, "detections")
    assert meta["images"] == len(SIZES)
    assert meta["candidates"] == len(det)
    assert meta["zero_candidate_images"] == int((images["num_candidates"] == 0).sum())
    assert meta["smoke_run"] is True and meta["img_per_s"] > 0
    assert {"device", "precision", "variant", "fingerprint"} <= meta.keys()
    preview = _preview_bytes(meta["preview"])
    assert preview.startswith(b"\x89PNG") and len(preview) < 100_000

    mmeta = _metadata(result, "masks")
    assert mmeta["candidates"] == len(masks_df) == len(det)
    assert mmeta["zero_candidate_images"] == meta["zero_candidate_images"]
    assert len(_preview_bytes(mmeta["preview"])) < 100_000


def test_a_rerun_reuses_up_to_date_shards_and_force_recomputes_the_same_bytes(shard_store):
    first_run = _materialize(shard_store, DetectorResource(backend="fake"), SegmenterResource(backend="fake"))
    assert first_run.success
    first = _files(shard_store)
    assert _metadata(first_run, "detections")["reused"] is False

    # Same inputs, model and settings (another batch size does not count): reused, nothing rewritten.
    path = shard_store.root / layout.masks(SHARD)
    stamp = path.stat().st_mtime_ns
    result = _materialize(
        shard_store, DetectorResource(backend="fake", batch_size=2), SegmenterResource(backend="fake")
    )
    detected, segmented = _metadata(result, "detections"), _metadata(result, "masks")
    assert detected["reused"] is True and segmented["reused"] is True
    assert path.stat().st_mtime_ns == stamp and _files(shard_store) == first
    # What it reused: the stored output, its counts and the model that made it.
    original = _metadata(first_run, "detections")
    for name in ("fingerprint", "path", "images", "candidates", "zero_candidate_images"):
        assert detected[name] == original[name], name
    assert detected["made_by"]["model"] == "fake_detector" and detected["made_by"]["batch_size"] == 8
    assert segmented["candidates"] == _metadata(first_run, "masks")["candidates"]

    # force: recomputed and rewritten, to the same bytes.
    force = {"force": True}
    result = _materialize(
        shard_store,
        DetectorResource(backend="fake"),
        SegmenterResource(backend="fake"),
        det_config=force,
        mask_config=force,
    )
    assert (
        _metadata(result, "detections")["reused"] is False and _metadata(result, "masks")["reused"] is False
    )
    assert path.stat().st_mtime_ns != stamp and _files(shard_store) == first

    # A changed setting changes the fingerprint: recomputed, new content.
    result = _materialize(
        shard_store,
        DetectorResource(backend="fake"),
        SegmenterResource(backend="fake"),
        det_config={"box_floor": 0.5},
    )
    assert _metadata(result, "detections")["reused"] is False
    assert _metadata(result, "masks")["reused"] is False
    assert read_parquet(shard_store, layout.detections(SHARD)).column("box_score").to_numpy().min() > 0.5


def test_one_prompt_per_class_and_multimask(shard_store):
    result = _materialize(
        shard_store,
        DetectorResource(backend="fake"),
        SegmenterResource(backend="fake"),
        det_config={"prompt": "plant . flower .", "one_prompt_per_class": True},
        mask_config={"multimask": True},
    )
    assert result.success
    det, _, masks_df = _check_tables(shard_store)
    assert set(det["phrase"]) <= {"plant", "flower"} and len(set(det["phrase"])) == 2
    # Merged captions: caption_index * num_queries + query, so each caption's boxes have their own range.
    caption = det["query_index"] // 900
    assert set(caption) == {0, 1}
    assert (det["phrase"] == np.where(caption == 0, "plant", "flower")).all()
    assert all(len(s) == 3 for s in masks_df["multimask_scores"])
    for row in masks_df.itertuples():
        assert row.mask_score == pytest.approx(max(row.multimask_scores))
        assert row.multimask_scores[row.multimask_index] == pytest.approx(row.mask_score)


@pytest.mark.model
def test_tiny_random_models_through_the_assets(shard_store, tmp_path, worker_python):
    """The real models (tiny random architectures, no checkpoint, no network) in model workers."""
    cache = str(tmp_path / "models")
    detector = DetectorResource(
        checkpoint="random",
        tiny=True,
        text_encoder="tiny-random",
        cache_dir=cache,
        batch_size=4,
        num_workers=2,
    )
    segmenter = SegmenterResource(
        checkpoint="random", tiny=True, variant="tiny", cache_dir=cache, batch_size=4, num_workers=2
    )
    config = {"max_candidates": 5}
    result = _materialize(shard_store, detector, segmenter, det_config=config)
    assert result.success
    det, images, _ = _check_tables(shard_store)
    assert (images["num_candidates"] <= 5).all() and len(det) > 0  # capped at max_candidates
    meta = _metadata(result, "detections")
    assert meta["smoke_run"] is True and "SMOKE RUN" in meta["smoke_run_note"]
    assert meta["weights"] == "random" and meta["variant"] == "swint_ogc-tiny"
    # Boxes live in each image's original pixel frame.
    sizes = images.set_index("image_id")[["width", "height"]]
    joined = det.join(sizes, on="image_id")
    assert (joined["x1"] <= joined["width"]).all() and (joined["y1"] <= joined["height"]).all()
    assert (joined["x0"] >= 0).all() and (joined["y0"] >= 0).all()

    first = _files(shard_store)
    force = {"force": True}
    again = _materialize(
        shard_store,
        detector.model_copy(),
        segmenter.model_copy(),
        det_config=config | force,
        mask_config=force,
    )
    assert again.success and _metadata(again, "detections")["reused"] is False
    assert _files(shard_store) == first  # seeded random init + CPU determinism: identical bytes


def test_ok_images_skips_quarantined_rows(shard_store):
    refs = ok_images(read_parquet(shard_store, layout.image_index(SHARD)))
    assert [(r.width, r.height) for r in refs] == SIZES and all(len(r.sha256) == 64 for r in refs)


def test_prefetched_batches_keep_order_bound_lookahead_and_raise():
    in_flight, peak, lock = [0], [0], threading.Lock()

    def load(x):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        return x * 10

    batches = []
    for batch in prefetched_batches(list(range(11)), load, batch_size=3, workers=2, lookahead_batches=1):
        with lock:
            in_flight[0] -= len(batch)
        batches.append(batch)
    assert batches == [[0, 10, 20], [30, 40, 50], [60, 70, 80], [90, 100]]
    assert peak[0] <= 6  # (lookahead + 1) * batch_size

    def fail(x):
        if x == 4:
            raise OSError("unreadable")
        return x

    with pytest.raises(OSError, match="unreadable"):
        list(prefetched_batches(list(range(8)), fail, batch_size=2, workers=2))
