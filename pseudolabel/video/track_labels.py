"""Stored tracks -> video labels: the label thresholds applied to whole tracks, on the CPU.

A track is kept when the detection that started it passes ``box_score`` and ``text_score`` and its
mean per-frame mask score passes ``mask_score``; within a kept track, frames whose mask covers less
than ``min_mask_area_fraction`` of the frame are dropped (a track left with no frame is dropped too).
The result is a ``schemas.VIDEO_LABELS`` table and a YouTube-VIS style JSON: ``videos`` (frame file
names in order), ``categories`` (the phrases) and one annotation per track with a per-frame list of
COCO RLE ``segmentations`` (None where the track has no mask), ``bboxes`` and ``areas``; the track id
is the instance id within its video (``track_id``), ``id`` is unique in the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pseudolabel import schemas
from pseudolabel.fingerprint import THRESHOLDS_METADATA_KEY, with_fingerprint
from pseudolabel.labels.coco import category_names
from pseudolabel.labels.thresholds import Thresholds, thresholds_fingerprint

TRACK_REJECT_REASONS = ("box_score", "text_score", "mask_score", "no_frame_large_enough")


@dataclass(frozen=True)
class TrackLabels:
    kept: pd.DataFrame  # VIDEO_LABELS rows, sorted by (video_id, frame_index, track_id)
    tracks_in: int
    tracks_kept: int
    rejected: dict[str, int] = field(default_factory=dict)  # tracks per first failed rule
    fingerprint: str = ""

    def table(self) -> pa.Table:
        table = pa.Table.from_pandas(self.kept, schema=schemas.VIDEO_LABELS, preserve_index=False)
        return with_fingerprint(table, self.fingerprint, THRESHOLDS_METADATA_KEY)


def label_tracks(tracks: pd.DataFrame, thresholds: Thresholds) -> TrackLabels:
    """Keep the tracks and frames of VIDEO_TRACKS rows ``tracks`` that pass ``thresholds``."""
    value = thresholds_fingerprint(thresholds)
    if tracks.empty:
        empty = pd.DataFrame({name: pd.Series(dtype=object) for name in schemas.VIDEO_LABELS.names})
        return TrackLabels(empty, 0, 0, dict.fromkeys(TRACK_REJECT_REASONS, 0), value)
    rows = tracks.sort_values(["video_id", "frame_index", "track_id"]).reset_index(drop=True)
    key = ["video_id", "track_id"]
    rows["track_mean_mask_score"] = rows.groupby(key)["mask_score"].transform("mean").astype(np.float32)
    rows["area_fraction"] = (rows["mask_area"] / (rows["height"] * rows["width"])).astype(np.float32)
    per_track = rows.groupby(key).agg(
        box_score=("box_score", "first"),
        text_score=("text_score", "first"),
        mask_score=("track_mean_mask_score", "first"),
        largest=("area_fraction", "max"),
    )
    failed = pd.Series("", index=per_track.index)
    for reason, passes in (  # first failed rule wins, in this order
        ("box_score", per_track["box_score"] >= thresholds.box_score),
        ("text_score", per_track["text_score"] >= thresholds.text_score),
        ("mask_score", per_track["mask_score"] >= thresholds.mask_score),
        ("no_frame_large_enough", per_track["largest"] >= thresholds.min_mask_area_fraction),
    ):
        failed[(failed == "") & ~passes] = reason
    rejected = {reason: int((failed == reason).sum()) for reason in TRACK_REJECT_REASONS}
    good = failed.index[failed == ""]
    in_good = pd.MultiIndex.from_frame(rows[key]).isin(good)
    kept = rows.loc[in_good & (rows["area_fraction"] >= thresholds.min_mask_area_fraction)].copy()
    kept["thresholds_fingerprint"] = value
    kept = kept[schemas.VIDEO_LABELS.names].reset_index(drop=True)
    return TrackLabels(kept, len(per_track), len(good), rejected, value)


def vis_json(
    kept: pd.DataFrame,
    videos: pd.DataFrame,
    frame_key: Callable[[str, int], str],
    *,
    categories: list[str] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """YouTube-VIS style dict (see module docstring). ``videos``: video_id, frames, width, height (every
    listed video appears, labelled or not); ``frame_key(video_id, n)`` names frame n's file."""
    names = categories if categories is not None else category_names(kept["phrase"])
    category_id = {name: i for i, name in enumerate(names, start=1)}
    video_records, video_number = [], {}
    for number, row in enumerate(videos.sort_values("video_id").itertuples(index=False), start=1):
        video_number[row.video_id] = (number, int(row.frames))
        video_records.append(
            {
                "id": number,
                "name": row.video_id,
                "width": int(row.width),
                "height": int(row.height),
                "length": int(row.frames),
                "file_names": [frame_key(row.video_id, n) for n in range(int(row.frames))],
            }
        )
    annotations = []
    for (video_id, track_id), track in kept.groupby(["video_id", "track_id"], sort=True):
        number, length = video_number[video_id]
        segmentations: list[Any] = [None] * length
        bboxes: list[Any] = [None] * length
        areas: list[Any] = [None] * length
        for row in track.itertuples(index=False):
            n = int(row.frame_index)
            segmentations[n] = {"size": [int(row.height), int(row.width)], "counts": row.rle_counts}
            bboxes[n] = [float(row.x0), float(row.y0), float(row.x1 - row.x0), float(row.y1 - row.y0)]
            areas[n] = int(row.mask_area)
        first = track.iloc[0]
        annotations.append(
            {
                "id": len(annotations) + 1,
                "video_id": number,
                "track_id": int(track_id),
                "category_id": category_id.get(first["phrase"] or "object", 1),
                "iscrowd": 0,
                "height": int(first["height"]),
                "width": int(first["width"]),
                "length": len(track),
                "segmentations": segmentations,
                "bboxes": bboxes,
                "areas": areas,
                "score": float(first["track_mean_mask_score"]),
                "box_score": float(first["box_score"]),
                "text_score": float(first["text_score"]),
            }
        )
    return {
        "info": dict(info or {}),
        "videos": video_records,
        "categories": [{"id": i, "name": name} for name, i in category_id.items()],
        "annotations": annotations,
    }


def video_sizes(frames_index: pd.DataFrame) -> pd.DataFrame:
    """video_id, frames, width, height of each video with "ok" frames in a VIDEO_FRAMES table."""
    ok = frames_index.loc[(frames_index["status"] == "ok") & (frames_index["frame_index"] >= 0)]
    return (
        ok.groupby("video_id")
        .agg(frames=("frame_index", "size"), width=("width", "first"), height=("height", "first"))
        .reset_index()
    )


def stride_frames(kept: pd.DataFrame, stride: int) -> pd.DataFrame:
    """(video_id, frame_index) of every ``stride``-th labelled frame of each video (its 0th, stride-th,
    ... labelled frame, in time order); empty for stride 0."""
    if stride <= 0 or kept.empty:
        return pd.DataFrame({"video_id": pd.Series(dtype=object), "frame_index": pd.Series(dtype=np.int32)})
    frames = kept[["video_id", "frame_index"]].drop_duplicates().sort_values(["video_id", "frame_index"])
    position = frames.groupby("video_id").cumcount()
    return frames.loc[(position % stride) == 0].reset_index(drop=True)
