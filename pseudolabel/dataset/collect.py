"""Gather every materialised pseudo_labels shard in storage into one sample table + instance table,
plus every ``frame_stride``-th labelled frame of each video of the materialised video_labels shards."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pseudolabel import layout
from pseudolabel.fingerprint import THRESHOLDS_METADATA_KEY, table_fingerprint
from pseudolabel.labels.coco import image_mask_fractions
from pseudolabel.labels.lineage import (
    PROVENANCE_FIELDS,
    STAGES,
    current_provenance,
    recorded_lineage,
    stage_provenance,
)
from pseudolabel.review.corrections import GOLD_OUTCOMES
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet
from pseudolabel.video.track_labels import stride_frames

_LABEL_KEY = re.compile(r"^pseudo_labels/(?P<shard>[^/]+)\.parquet$")
_VIDEO_LABEL_KEY = re.compile(r"^video_labels/(?P<shard>[^/]+)\.parquet$")

SAMPLE_COLUMNS = [
    "image_id",
    "shard",
    "url",
    "label",
    "width",
    "height",
    "source_sha256",
    "instance_count",
    "mask_fraction",
    "thresholds_fingerprint",
    "detector_model",
    "detector_backend",
    "detector_checkpoint_sha256",
    "detector_fingerprint",
    "segmenter_model",
    "segmenter_backend",
    "segmenter_checkpoint_sha256",
    "segmenter_fingerprint",
    "source_key",  # storage key of the source picture: the shard's image, or a video frame
    "verified",  # a reviewer's masks replace the pseudo-labels of this image
]
PROVENANCE_COLUMNS = [f"{stage}_{field}" for stage in STAGES for field in PROVENANCE_FIELDS]


@dataclass(frozen=True)
class Collected:
    samples: pd.DataFrame  # SAMPLE_COLUMNS, one row per image
    instances: pd.DataFrame  # PSEUDO_LABELS rows of those images, plus their shard
    shards: list[str]
    duplicate_images: int = 0  # image ids seen in more than one shard (first shard wins)
    warnings: list[str] = field(default_factory=list)


def labelled_shards(
    store: ObjectStore, prefix: str = "pseudo_labels/", pattern: re.Pattern = _LABEL_KEY
) -> list[str]:
    shards = []
    for info in store.list(prefix):
        match = pattern.match(info.key)
        if match:
            shards.append(match.group("shard"))
    return shards


def video_labelled_shards(store: ObjectStore) -> list[str]:
    return labelled_shards(store, "video_labels/", _VIDEO_LABEL_KEY)


def _read_optional(store: ObjectStore, key: str, columns: list[str]) -> pd.DataFrame | None:
    try:
        table = read_parquet(store, key)
    except ObjectNotFound:
        return None
    present = [c for c in columns if c in table.column_names]
    return table.select(present).to_pandas()


def with_reviews(instances: pd.DataFrame, gold: pd.DataFrame | None) -> pd.DataFrame:
    """``instances`` where every reviewed image's pseudo-labels are replaced by its gold instances
    (accepted, corrected, added; none when the reviewer rejected everything), flagged ``verified``.
    A verified instance has no model scores: they read 1.0."""
    instances = instances.assign(verified=False)
    if gold is None or gold.empty:
        return instances
    human = gold.assign(verified=True, box_score=1.0, text_score=1.0, mask_score=1.0)
    human = human.reindex(columns=instances.columns)
    machine = instances.loc[~instances["image_id"].isin(set(gold["image_id"]))]
    return pd.concat([machine, human], ignore_index=True).sort_values("image_id", kind="stable")


def collect_shard(
    store: ObjectStore, shard: str, reviewed: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(samples, instances) of one shard; samples include images with no kept instance. ``reviewed``:
    the shard's reviewed images as :data:`~pseudolabel.schemas.REVIEWED_LABELS` rows, whose
    gold instances replace the pseudo-labels of those images (:func:`with_reviews`)."""
    table = read_parquet(store, layout.pseudo_labels(shard))
    reviewed = reviewed if reviewed is not None else pd.DataFrame(columns=["image_id", "outcome"])
    # A reviewed image with every proposal rejected has no gold instance but is still reviewed.
    reviewed_ids = set(reviewed["image_id"])
    instances = with_reviews(table.to_pandas(), reviewed.loc[reviewed["outcome"].isin(GOLD_OUTCOMES)])
    instances = instances.loc[~instances["image_id"].isin(reviewed_ids) | instances["verified"]]
    fingerprint = table_fingerprint(table, THRESHOLDS_METADATA_KEY) or (
        instances["thresholds_fingerprint"].iloc[0] if len(instances) else None
    )
    # Every image the detector saw (zero-candidate ones too); fall back to labelled images only.
    images = _read_optional(store, layout.detection_images(shard), ["image_id", "width", "height"])
    if images is None:
        images = instances.groupby("image_id", as_index=False)[["width", "height"]].first()
    index = _read_optional(store, layout.image_index(shard), ["image_id", "url", "label", "sha256"])
    if index is not None:
        images = images.merge(index, on="image_id", how="left")
    samples = images.rename(columns={"sha256": "source_sha256"})
    for column in ("url", "label", "source_sha256"):
        if column not in samples:
            samples[column] = None
    counts = instances.groupby("image_id").size()
    samples["instance_count"] = samples["image_id"].map(counts).fillna(0).astype(np.int64)
    samples["mask_fraction"] = samples["image_id"].map(image_mask_fractions(instances)).fillna(0.0)
    samples["shard"] = shard
    samples["verified"] = samples["image_id"].isin(reviewed_ids)
    samples["source_key"] = [layout.image(shard, image_id) for image_id in samples["image_id"]]
    instances["shard"] = shard
    samples["thresholds_fingerprint"] = fingerprint
    # The models that made these labels, as pseudo_labels recorded them; labels made before lineage was
    # recorded fall back to the sidecars stored now.
    lineage = recorded_lineage(table.schema) or current_provenance(store, shard)
    for column in PROVENANCE_COLUMNS:
        samples[column] = lineage.get(column)
    return samples[SAMPLE_COLUMNS], instances


def frame_sample_id(video_id: str, frame_index: int) -> str:
    return f"{video_id}-f{int(frame_index):06d}"


def collect_video_shard(store: ObjectStore, shard: str, stride: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(samples, instances) of every ``stride``-th labelled frame of each video of one video_labels
    shard; a sample's id is ``<video_id>-f<frame_index:06d>``, its instances the frame's kept tracks
    (``candidate_id`` = track id). Provenance: the tracks' detector, and the tracker as "segmenter"."""
    table = read_parquet(store, layout.video_labels(shard))
    kept = table.to_pandas()
    picked = stride_frames(kept, stride)
    instances = kept.merge(picked, on=["video_id", "frame_index"])
    instances["image_id"] = [
        frame_sample_id(v, n) for v, n in zip(instances["video_id"], instances["frame_index"], strict=True)
    ]
    instances["candidate_id"] = instances["track_id"]
    instances["shard"] = shard
    frames = read_parquet(store, layout.video_frames_index(shard)).to_pandas()
    samples = picked.merge(
        frames[["video_id", "frame_index", "url", "label", "width", "height", "sha256"]],
        on=["video_id", "frame_index"],
        how="left",
    ).rename(columns={"sha256": "source_sha256"})
    samples["image_id"] = [
        frame_sample_id(v, n) for v, n in zip(samples["video_id"], samples["frame_index"], strict=True)
    ]
    samples["source_key"] = [
        layout.video_frame(shard, v, int(n))
        for v, n in zip(samples["video_id"], samples["frame_index"], strict=True)
    ]
    counts = instances.groupby("image_id").size()
    samples["instance_count"] = samples["image_id"].map(counts).fillna(0).astype(np.int64)
    samples["mask_fraction"] = samples["image_id"].map(image_mask_fractions(instances)).fillna(0.0)
    samples["shard"] = shard
    samples["thresholds_fingerprint"] = table_fingerprint(table, THRESHOLDS_METADATA_KEY)
    for column, value in _video_provenance(store, shard).items():
        samples[column] = value
    samples["verified"] = False
    return samples[SAMPLE_COLUMNS], instances.drop(columns=["video_id"]).assign(verified=False)


def _video_provenance(store: ObjectStore, shard: str) -> dict[str, str | None]:
    try:
        meta = store.get_json(layout.provenance(layout.video_tracks(shard)))
    except (ObjectNotFound, ValueError):
        meta = {}
    fingerprint = meta.get("fingerprint")
    return {
        **stage_provenance(meta.get("detector") or {}, "detector", fingerprint),
        **stage_provenance(meta, "segmenter", fingerprint),
    }


def collect(
    store: ObjectStore,
    shards: list[str] | None = None,
    frame_stride: int = 0,
    reviewed: pd.DataFrame | None = None,
) -> Collected:
    """Image samples of ``shards`` (default: every pseudo_labels shard), plus with ``frame_stride`` > 0
    every ``frame_stride``-th labelled frame of each video of every video_labels shard. ``reviewed``
    (:data:`~pseudolabel.schemas.REVIEWED_LABELS` rows) puts reviewers' masks on the images they reviewed."""
    shards = labelled_shards(store) if shards is None else shards
    by_shard = dict(tuple(reviewed.groupby("shard"))) if reviewed is not None and len(reviewed) else {}
    sample_parts, instance_parts = [], []
    for shard in shards:
        samples, instances = collect_shard(store, shard, by_shard.get(shard))
        sample_parts.append(samples)
        instance_parts.append(instances)
    video_shards = video_labelled_shards(store) if frame_stride > 0 else []
    for shard in video_shards:
        samples, instances = collect_video_shard(store, shard, frame_stride)
        sample_parts.append(samples)
        instance_parts.append(instances)
    shards = list(shards) + [s for s in video_shards if s not in shards]
    if not sample_parts:
        return Collected(pd.DataFrame(columns=SAMPLE_COLUMNS), pd.DataFrame(), [])
    samples = pd.concat(sample_parts, ignore_index=True)
    instances = pd.concat(instance_parts, ignore_index=True)
    duplicated = samples["image_id"].duplicated()
    warnings = []
    if duplicated.any():
        warnings.append(f"{int(duplicated.sum())} image ids appear in more than one shard; kept the first")
        samples = samples.loc[~duplicated].reset_index(drop=True)
        owner = instances["image_id"].map(samples.set_index("image_id")["shard"])
        instances = instances.loc[(owner == instances["shard"]).to_numpy()].reset_index(drop=True)
    return Collected(samples, instances, list(shards), int(duplicated.sum()), warnings)
