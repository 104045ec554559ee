"""One shard through a GPU stage, as a worker runs it: the storage around the stage logic.

Reads the shard's inputs, reuses its stored output when that already has the shard's fingerprint
(unless forced: a re-run or retry redoes only what is missing or changed), runs the stage
(:mod:`pseudolabel.models.stages`), writes the provenance sidecar and the outputs, and returns the
shard's materialization metadata (Pipes format, see :mod:`.task`): counts, timings, settings, model
identity and a small preview. Outputs are written atomically by the store, images table (and the
detector's own masks, when it makes them: SAM 3) before detections (masks reads them all), so a
half-written shard is never visible. The segmenter backend "detector" copies those stored masks
instead of segmenting: no model, no GPU.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pseudolabel import layout
from pseudolabel.fingerprint import stored_fingerprint, table_fingerprint, up_to_date, with_fingerprint
from pseudolabel.ids import sha256_hex
from pseudolabel.models.interfaces import Candidates, Detector, Segmenter
from pseudolabel.models.loading import ModelConfigError
from pseudolabel.models.report import SMOKE_RUN_NOTE, boxes_preview, masks_preview, model_metadata, throughput
from pseudolabel.models.sam3 import no_masks_message
from pseudolabel.models.stages import (
    DetectionSettings,
    ImageRef,
    SegmentationSettings,
    content_identity,
    detection_fingerprint,
    ok_images,
    run_detection,
    run_segmentation,
    segmentation_fingerprint,
)
from pseudolabel.rle import EncodedMasks
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet, write_parquet
from pseudolabel.video.tracking import Tracker, TrackingSettings
from pseudolabel.video.tracks_table import ok_videos, track_shard_videos, tracking_fingerprint
from pseudolabel.workers.task import meta


def detect_shard(
    store: ObjectStore,
    shard: str,
    detector: Detector,
    settings: DetectionSettings,
    *,
    workers: int,
    force: bool = False,
) -> dict[str, Any]:
    """Every candidate above the floors for every "ok" image of ``shard`` -> detections parquet files, plus
    the detector's masks (``detections/<shard>.masks.parquet``) when it makes them (SAM 3). Unless
    ``force``, a shard whose stored detections have the current fingerprint is reused as it is."""
    images = ok_images(read_parquet(store, layout.image_index(shard)))
    identity = detector.describe()
    fingerprint = detection_fingerprint(images, settings, identity)
    keys = [layout.detection_images(shard), layout.detections(shard)]
    if not force and up_to_date(store, keys, fingerprint):
        counts = _candidate_counts(read_parquet(store, keys[0]))
        return _reused(store, keys[1], fingerprint, counts)

    decoding = getattr(detector, "decoding", None)  # device JPEG decoding (opt-in): counts fallbacks
    before = dict(decoding.fallbacks) if decoding is not None else {}
    result = run_detection(
        images,
        lambda image_id: store.get_bytes(layout.image(shard, image_id)),
        detector,
        settings,
        workers=workers,
    )
    _write_provenance(store, keys[1], identity, settings, fingerprint)
    write_parquet(store, keys[0], result.images_table(fingerprint))  # images first: masks reads both
    masks_key = layout.detection_masks(shard)
    made_masks = any(found.masks is not None for found in result.images)
    if made_masks:  # same fingerprint as the detections they belong to
        write_parquet(store, masks_key, result.masks_table(fingerprint))
    else:  # an earlier detector's masks must never pass for these detections
        store.delete(masks_key)
    write_parquet(store, keys[1], result.detections_table(fingerprint))

    metadata = {
        "images": meta(len(result.images)),
        "candidates": meta(result.num_candidates),
        "zero_candidate_images": meta(result.zero_candidate_images),
        "capped_images": meta(result.capped_images(settings.max_candidates)),
        "img_per_s": meta(throughput(len(result.images), result.seconds)),
        "seconds": meta(round(result.seconds, 3)),
        "prompt": meta(settings.prompt),
        "captions": meta(" | ".join(settings.captions())),
        "box_floor": meta(settings.box_floor),
        "text_floor": meta(settings.text_floor),
        "detector_masks": meta(made_masks),
    }
    if (report := getattr(detector, "match_report", None)) is not None:  # annotations: what matched
        metadata["annotations_matched"] = meta(report(), "json")
    if decoding is not None and decoding.on_device:  # this shard's images the device decoder left to PIL
        fallbacks = {reason: n - before.get(reason, 0) for reason, n in decoding.fallbacks.items()}
        metadata["device_decode_fallbacks"] = meta(fallbacks, "json")
    return metadata | _written(store, shard, keys[1], identity, fingerprint, result.images, boxes_preview)


def segment_shard(
    store: ObjectStore,
    shard: str,
    segmenter: Segmenter,
    settings: SegmentationSettings,
    *,
    workers: int,
    force: bool = False,
) -> dict[str, Any]:
    """One mask per detection candidate of ``shard`` (box prompt) -> masks parquet (COCO RLE); with the
    segmenter backend "detector", the masks the detector stored with these detections (no model).
    Unless ``force``, a shard whose stored masks have the current fingerprint is reused as it is."""
    detections_bytes = store.get_bytes(layout.detections(shard))
    detections = pq.read_table(io.BytesIO(detections_bytes))
    images = read_parquet(store, layout.detection_images(shard))
    identity = segmenter.describe()
    fingerprint = segmentation_fingerprint(sha256_hex(detections_bytes), settings, identity)
    key = layout.masks(shard)
    if not force and up_to_date(store, [key], fingerprint):
        return _reused(store, key, fingerprint, _candidate_counts(images))
    if getattr(segmenter, "from_detections", False):
        return _copy_detection_masks(store, shard, detections, images, identity, settings, fingerprint)

    result = run_segmentation(
        Candidates.from_tables(detections, images),
        lambda image_id: store.get_bytes(layout.image(shard, image_id)),
        segmenter,
        settings,
        workers=workers,
    )
    _write_provenance(store, key, identity, settings, fingerprint)
    write_parquet(store, key, result.masks_table(fingerprint))

    segmented = len(result.images) - result.zero_candidate_images
    metadata = {
        "images": meta(len(result.images)),
        "candidates": meta(result.num_candidates),
        "zero_candidate_images": meta(result.zero_candidate_images),
        "img_per_s": meta(throughput(segmented, result.seconds)),
        "seconds": meta(round(result.seconds, 3)),
        "multimask": meta(settings.multimask),
    }
    return metadata | _written(store, shard, key, identity, fingerprint, result.images, masks_preview)


def _copy_detection_masks(
    store: ObjectStore,
    shard: str,
    detections: pa.Table,
    images: pa.Table,
    identity: dict[str, Any],
    settings: SegmentationSettings,
    fingerprint: str,
) -> dict[str, Any]:
    """The masks stage with the segmenter backend "detector": the detector's masks stored with exactly
    these detections (same fingerprint), under the segmentation fingerprint."""
    started = time.perf_counter()
    source = layout.detection_masks(shard)
    made_by = table_fingerprint(detections)
    stored = stored_fingerprint(store, source)
    if stored is None or stored != made_by:
        why = "this shard's detections stored no masks" if stored is None else f"{source} is stale"
        raise ModelConfigError(no_masks_message(f"{shard}: {why}"))
    table = read_parquet(store, source)
    key = layout.masks(shard)
    _write_provenance(store, key, identity, settings, fingerprint)
    write_parquet(store, key, with_fingerprint(table, fingerprint))

    found = _with_stored_masks(Candidates.from_tables(detections, images), table)
    metadata = {
        "images": meta(len(found)),
        "candidates": meta(sum(len(c) for c in found)),
        "zero_candidate_images": meta(sum(1 for c in found if not len(c))),
        "seconds": meta(round(time.perf_counter() - started, 3)),
        "multimask": meta(False),  # one mask per instance (the detector's)
        "masks_from": meta(store.uri(source), "path"),
    }
    return metadata | _written(store, shard, key, identity, fingerprint, found, masks_preview)


def _with_stored_masks(items: list[Candidates], table: pa.Table) -> list[Candidates]:
    """``items`` (sorted by image_id, rows in candidate_id order) with the masks of a MASKS table."""
    table = table.sort_by([("image_id", "ascending"), ("candidate_id", "ascending")])
    ids = table.column("image_id").to_pylist()
    column = lambda name: table.column(name).to_numpy()  # noqa: E731
    counts = table.column("rle_counts").to_pylist()
    bboxes = np.stack([column(c) for c in ("mask_x", "mask_y", "mask_w", "mask_h")], axis=1).astype(
        np.float32
    )
    areas, scores = column("mask_area").astype(np.int64), column("mask_score").astype(np.float32)
    index, outputs = column("multimask_index").astype(np.int8), table.column("multimask_scores").to_pylist()
    out, start = [], 0
    for found in items:
        rows = slice(start, start + len(found))
        start += len(found)
        if ids[rows] != [found.image_id] * len(found):
            raise ValueError(f"the stored masks do not match the detections of image {found.image_id}")
        masks = EncodedMasks(
            counts[rows], found.height, found.width, areas[rows], bboxes[rows].reshape(-1, 4)
        )
        multimask = np.asarray(outputs[rows] or np.zeros((0, 1)), np.float32).reshape(len(found), -1)
        out.append(found.with_masks(masks, scores[rows], index[rows], multimask))
    return out


def gold_candidates(
    store: ObjectStore,
    prefix: str,
    detector: Detector,
    segmenter: Segmenter,
    detection: DetectionSettings,
    segmentation: SegmentationSettings,
    *,
    workers: int,
) -> dict[str, Any]:
    """Both stages, exactly as the chain runs them, over the gold images under ``prefix`` -> the
    chain's three candidate tables under ``prefix/candidates/`` (label_quality re-thresholds them)."""
    gold = layout.label_quality_gold_image(prefix, "")
    read = lambda image_id: store.get_bytes(layout.label_quality_gold_image(prefix, image_id))  # noqa: E731
    refs = []
    for info in store.list(gold):
        image_id = info.key[len(gold) :]
        with Image.open(io.BytesIO(read(image_id))) as header:
            width, height = header.size
        refs.append(ImageRef(image_id, width, height))
    found = run_detection(refs, read, detector, detection, workers=workers)
    masks = run_segmentation(found.images, read, segmenter, segmentation, workers=workers)
    tables = {
        "detections": found.detections_table(""),
        "detection_images": found.images_table(""),
        "masks": masks.masks_table(""),
    }
    for name, table in tables.items():
        write_parquet(store, layout.label_quality_candidates(prefix, name), table)
    return {
        "images": meta(len(refs)),
        "candidates": meta(found.num_candidates),
        "seconds": meta(round(found.seconds + masks.seconds, 3)),
        "detector": meta(model_metadata(detector.describe()), "json"),
        "segmenter": meta(model_metadata(segmenter.describe()), "json"),
    }


def track_shard(
    store: ObjectStore,
    shard: str,
    detector: Detector,
    tracker: Tracker,
    detection: DetectionSettings,
    tracking: TrackingSettings,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Detector keyframes + tracker over every video of ``shard`` -> video_tracks parquet (COCO RLE).
    Unless ``force``, a shard whose stored tracks have the current fingerprint is reused as it is."""
    videos = ok_videos(read_parquet(store, layout.video_frames_index(shard)))
    identity, tracker_identity = detector.describe(), tracker.describe()
    fingerprint = tracking_fingerprint(
        videos, detection, tracking, content_identity(identity), content_identity(tracker_identity)
    )
    key = layout.video_tracks(shard)
    if not force and up_to_date(store, [key], fingerprint):
        return _reused(store, key, fingerprint, {"videos": meta(len(videos))})

    settings = {"detections": vars(detection), "tracking": vars(tracking)}
    store.put_json(  # provenance first: a visible output never has an older sidecar
        layout.provenance(key),
        {
            **model_metadata(tracker_identity),
            "detector": model_metadata(identity),
            "settings": settings,
            "fingerprint": fingerprint,
        },
    )
    result = track_shard_videos(store, shard, videos, detector, tracker, detection, tracking, fingerprint)
    metadata = {name: meta(value) for name, value in result.summary().items()}
    metadata |= {f"tracker_{k}": meta(v) for k, v in model_metadata(tracker_identity).items()}
    metadata |= {f"detector_{k}": meta(v) for k, v in model_metadata(identity).items()}
    smoke = bool(identity.get("smoke_run") or tracker_identity.get("smoke_run"))
    metadata |= {
        "smoke_run": meta(smoke),
        "prompt": meta(detection.prompt),
        "keyframe_every": meta(tracking.keyframe_every),
        "match_iou": meta(tracking.match_iou),
        "max_lost_keyframes": meta(tracking.max_lost_keyframes),
        "fingerprint": meta(fingerprint),
        "reused": meta(False),
        "skipped": meta(False),
        "path": meta(store.uri(key), "path"),
    }
    if smoke:
        metadata["smoke_run_note"] = meta(SMOKE_RUN_NOTE)
    if result.preview is not None:
        metadata["preview"] = meta(result.preview, "md")
    return metadata


def _write_provenance(store: ObjectStore, key: str, identity: dict, settings: Any, fingerprint: str) -> None:
    """The sidecar the AutoSAM2 manifest's provenance columns come from; written before the output,
    so a visible output never has an older sidecar."""
    store.put_json(
        layout.provenance(key),
        {
            **model_metadata(identity),
            "settings": vars(settings),
            "fingerprint": fingerprint,
        },
    )


def _written(
    store: ObjectStore,
    shard: str,
    key: str,
    identity: dict[str, Any],
    fingerprint: str,
    images: list[Candidates],
    preview: Callable[[bytes, Candidates], str],
) -> dict[str, Any]:
    """What every written shard reports besides its counts: model identity, fingerprint, output path
    and a preview of the first image with candidates."""
    metadata = {name: meta(value) for name, value in model_metadata(identity).items()}
    metadata |= {
        "fingerprint": meta(fingerprint),
        "reused": meta(False),
        "skipped": meta(False),
        "path": meta(store.uri(key), "path"),
    }
    first = next((found for found in images if len(found)), None)
    if first is not None:
        metadata["preview"] = meta(preview(store.get_bytes(layout.image(shard, first.image_id)), first), "md")
    return metadata


def _candidate_counts(images: pa.Table) -> dict[str, Any]:
    """A shard's counts read back from its stored DETECTION_IMAGES table (one row per image)."""
    per_image = images.column("num_candidates").to_pylist()
    return {
        "images": meta(len(per_image)),
        "candidates": meta(int(sum(per_image))),
        "zero_candidate_images": meta(sum(1 for n in per_image if not n)),
    }


def _reused(store: ObjectStore, key: str, fingerprint: str, counts: dict[str, Any]) -> dict[str, Any]:
    """The metadata of a shard whose stored output already had ``fingerprint``: nothing was computed, and
    the materialization says what it stands for: the output (path, fingerprint, counts) and the models
    and settings that made it (its provenance sidecar, ``made_by``). ``skipped`` is the older name."""
    try:
        made_by = store.get_json(layout.provenance(key))
    except (ObjectNotFound, ValueError):
        made_by = None
    metadata = {
        **counts,
        "reused": meta(True),
        "skipped": meta(True),
        "fingerprint": meta(fingerprint),
        "path": meta(store.uri(key), "path"),
    }
    if isinstance(made_by, dict):
        metadata["made_by"] = meta(made_by, "json")
        metadata["smoke_run"] = meta(bool(made_by.get("smoke_run", False)))
    return metadata
