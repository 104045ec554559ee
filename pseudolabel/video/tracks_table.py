"""A shard's videos through the tracker: frames index in, ``video_tracks/<shard>.parquet`` out.

Rows (``schemas.VIDEO_TRACKS``) are streamed into a local Parquet file, a row group at a time, as the
tracker produces them, and the finished file is stored in one atomic write: a shard never holds more
than a row group of masks in memory, and a half-tracked shard is never visible. The shard's summary
(tracks, lengths, timings) and a strip of tracked frames are what its materialization shows.
"""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pseudolabel import layout, schemas
from pseudolabel.fingerprint import METADATA_KEY, fingerprint, model_identity
from pseudolabel.markdown import markdown_image
from pseudolabel.models.interfaces import Detector
from pseudolabel.models.stages import DetectionSettings
from pseudolabel.preview import draw_masks, thumbnail_grid
from pseudolabel.storage import ObjectStore, read_parquet, write_parquet
from pseudolabel.video.tracking import TRACKING_VERSION, Tracker, TrackingSettings, VideoTracks, track_video

ROW_GROUP = 4096  # rows buffered before a row group is written
STRIP_FRAMES = 6  # tracked frames in the UI preview strip


@dataclass(frozen=True)
class VideoRef:
    video_id: str
    frames: int  # "ok" frames 0..frames-1
    sha256: tuple[str, ...]  # per frame, for the fingerprint


def ok_videos(index: pa.Table) -> list[VideoRef]:
    """Videos of a VIDEO_FRAMES table with their "ok" frames, sorted by video_id. A video's frames must
    be 0..n-1 (what ``video_frames`` stores); a gap would misalign the tracker's window, so it is an error."""
    frames: dict[str, dict[int, str]] = {}
    for row in index.select(["video_id", "frame_index", "sha256", "status"]).to_pylist():
        if row["status"] == "ok" and row["frame_index"] >= 0:
            frames.setdefault(row["video_id"], {})[int(row["frame_index"])] = row["sha256"] or ""
    refs = []
    for video_id in sorted(frames):
        by_index = frames[video_id]
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"video {video_id}: stored frames are not 0..{len(by_index) - 1}")
        refs.append(VideoRef(video_id, len(by_index), tuple(by_index[i] for i in range(len(by_index)))))
    return refs


def shard_has_videos(store: ObjectStore, shard: str) -> bool:
    """Whether ``video_frames`` stored any "ok" frame for ``shard`` (raises ObjectNotFound before it ran)."""
    index = read_parquet(store, layout.video_frames_index(shard), columns=["status"])
    return any(status == "ok" for status in index.column("status").to_pylist())


def write_no_tracks(store: ObjectStore, shard: str) -> str:
    """The output of a shard without videos: an empty tracks table, written without a model worker."""
    key = layout.video_tracks(shard)
    write_parquet(store, key, schemas.VIDEO_TRACKS.empty_table())
    return key


def tracking_fingerprint(
    videos: list[VideoRef],
    detection: DetectionSettings,
    tracking: TrackingSettings,
    detector: dict,
    tracker: dict,
) -> str:
    return fingerprint(
        {
            "stage": TRACKING_VERSION,
            "videos": [(v.video_id, v.sha256) for v in videos],
            "detection": asdict(detection),
            "tracking": asdict(tracking),
            "detector": model_identity(detector),
            "tracker": model_identity(tracker),
        }
    )


@dataclass
class ShardTracks:
    videos: list[VideoTracks] = field(default_factory=list)
    seconds: float = 0.0
    preview: str | None = None  # Markdown image: a strip of tracked frames

    @property
    def frames(self) -> int:
        return sum(v.frames for v in self.videos)

    @property
    def rows(self) -> int:
        return sum(v.rows for v in self.videos)

    def summary(self) -> dict[str, float | int]:
        lengths = [n for v in self.videos for n in v.track_lengths]
        tracked_s = sum(v.detect_s + v.track_s for v in self.videos)
        return {
            "videos": len(self.videos),
            "frames": self.frames,
            "rows": self.rows,
            "tracks": len(lengths),
            "tracks_started": sum(v.started for v in self.videos),
            "tracks_ended": sum(v.ended for v in self.videos),
            "mean_track_length": round(float(np.mean(lengths)), 3) if lengths else 0.0,
            "keyframes": sum(v.keyframes for v in self.videos),
            "max_window_frames": max((v.max_window_frames for v in self.videos), default=0),
            "detect_s": round(sum(v.detect_s for v in self.videos), 3),
            "track_s": round(sum(v.track_s for v in self.videos), 3),
            "frames_per_s": round(self.frames / tracked_s, 3) if tracked_s > 0 else 0.0,
            "seconds": round(self.seconds, 3),
        }


def track_shard_videos(
    store: ObjectStore,
    shard: str,
    videos: list[VideoRef],
    detector: Detector,
    tracker: Tracker,
    detection: DetectionSettings,
    tracking: TrackingSettings,
    fingerprint_value: str,
) -> ShardTracks:
    """Track every video of ``shard`` and store ``video_tracks/<shard>.parquet`` (atomically)."""
    started = time.perf_counter()
    result = ShardTracks()
    schema = schemas.VIDEO_TRACKS.with_metadata({METADATA_KEY: fingerprint_value.encode()})
    with tempfile.TemporaryDirectory(prefix="video-tracks-") as tmp:
        path = Path(tmp) / "tracks.parquet"
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            buffer: dict[str, list] = {name: [] for name in schema.names}

            def flush() -> None:
                if buffer["video_id"]:
                    writer.write_table(pa.table(buffer, schema=schema))
                    for values in buffer.values():
                        values.clear()

            def emit(rows: dict[str, list]) -> None:
                for name, values in rows.items():
                    buffer[name].extend(values)
                if len(buffer["video_id"]) >= ROW_GROUP:
                    flush()

            for video in videos:
                read = lambda i, v=video.video_id: store.get_bytes(layout.video_frame(shard, v, i))  # noqa: E731
                result.videos.append(
                    track_video(
                        video.video_id, video.frames, read, detector, tracker, detection, tracking, emit, tmp
                    )
                )
            flush()
        result.seconds = time.perf_counter() - started
        result.preview = _strip(store, shard, path)
        store.put_bytes(layout.video_tracks(shard), path.read_bytes())
    return result


def _strip(store: ObjectStore, shard: str, path: Path) -> str | None:
    """Up to STRIP_FRAMES evenly spaced tracked frames of the shard's first tracked video, masks drawn
    (colours in track-id order), as one Markdown image."""
    table = pq.read_table(
        path, columns=["video_id", "frame_index", "track_id", "rle_counts", "height", "width"]
    )
    if not table.num_rows:
        return None
    rows = table.to_pandas()
    video_id = rows["video_id"].iloc[0]
    rows = rows.loc[rows["video_id"] == video_id].sort_values(["frame_index", "track_id"])
    frames = rows["frame_index"].unique()
    picked = frames[np.linspace(0, len(frames) - 1, min(STRIP_FRAMES, len(frames))).round().astype(int)]
    tiles = []
    for index in picked:
        frame = rows.loc[rows["frame_index"] == index]
        data = store.get_bytes(layout.video_frame(shard, video_id, int(index)))
        png = draw_masks(
            data, frame["rle_counts"].tolist(), int(frame["height"].iloc[0]), int(frame["width"].iloc[0])
        )
        tiles.append(Image.open(io.BytesIO(png)))
    strip = thumbnail_grid(tiles, columns=len(tiles), image_format="PNG")
    return markdown_image(strip, f"{video_id}: frames {', '.join(map(str, picked))} with tracked masks")
