"""``video_frames``: the shard's videos as upright JPEG frames at a chosen rate plus a per-shard index."""

# No `from __future__ import annotations` here: Dagster resolves the config/resource parameter
# annotations at decoration time and cannot resolve them from strings.
from dagster import (
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.common import (
    fail_above_rate,
    materialize_each_shard,
    network_retry,
    shard_partitions,
    shards_per_run,
)
from pseudolabel import layout
from pseudolabel.images.download import DownloadPolicy
from pseudolabel.images.index import SAMPLE_COLUMNS, shard_items, split_videos
from pseudolabel.markdown import markdown_image
from pseudolabel.preview import thumbnail_grid
from pseudolabel.storage import ObjectStore, read_parquet
from pseudolabel.video.decode import DEFAULT_FPS, DEFAULT_MAX_FRAMES, DecodeOptions
from pseudolabel.video.frames import preview_frames
from pseudolabel.video.shard import VIDEO_MAX_BYTES, VideoOptions, VideoShardResult, process_video_shard
from resources.storage import StorageResource

PREVIEW_VIDEOS = 3
PREVIEW_FRAMES_PER_VIDEO = 4


class VideoFramesConfig(Config):
    fps: float = Field(
        default=DEFAULT_FPS,
        description="Frames kept per second of video (the first of each 1/fps slot); 0 keeps every frame. "
        "Frame prefixes are taken frame by frame regardless.",
    )
    max_frames: int = Field(
        default=DEFAULT_MAX_FRAMES, description="Frames kept per video at most (decoding stops there)."
    )
    max_bytes: int = Field(
        default=VIDEO_MAX_BYTES, description="Larger video files are quarantined as too_large."
    )
    timeout_s: float = Field(default=300.0, description="Deadline per download attempt (connect + body).")
    max_retries: int = Field(
        default=3, description="Retries after 5xx / 429 / timeouts / dropped connections."
    )
    concurrency: int = Field(
        default=4,
        description="Videos downloaded and decoded at once (each needs up to max_bytes of temp disk).",
    )
    jpeg_quality: int = Field(default=95, description="Quality of the stored JPEG frames.")
    max_failure_rate: float = Field(
        default=0.2, description="Fail the shard above this quarantined fraction of its videos."
    )

    def video_options(self) -> VideoOptions:
        return VideoOptions(
            download=DownloadPolicy(
                concurrency=self.concurrency,
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
                max_bytes=self.max_bytes,
            ),
            decode=DecodeOptions(fps=self.fps, max_frames=self.max_frames),
            jpeg_quality=self.jpeg_quality,
        )


@asset(
    partitions_def=shard_partitions,
    retry_policy=network_retry(),
    backfill_policy=shards_per_run(),
    deps=["stratified_sample"],
    group_name="video",
    description=(
        "The shard's sampled videos (mp4/webm/mov/mkv/avi URLs, or frame prefixes ending in '/') as upright "
        "RGB JPEG frames at `fps` under video_frames/<shard>/<video_id>/<n>.jpg; video_frames/<shard>.parquet "
        "indexes them (bad videos quarantined with a reason). Image items are left to normalized_images."
    ),
)
def video_frames(
    context: AssetExecutionContext, config: VideoFramesConfig, storage: StorageResource
) -> MaterializeResult:
    """One shard per partition; a backfill run takes a range of shards, each its own materialization."""
    store = storage.store()
    sample = read_parquet(store, layout.SAMPLE, columns=SAMPLE_COLUMNS)
    options = config.video_options()

    def one_shard(shard: str) -> dict[str, object]:
        images, videos = split_videos(shard_items(sample, shard))
        context.log.info(
            f"{shard}: {len(videos)} sampled videos ({len(images)} images left to normalized_images)"
        )
        result = process_video_shard(store, shard, videos, options, progress=context.log.info)
        metadata = _metadata(store, shard, result)
        stats = result.stats
        context.log.info(
            f"{shard}: {stats.ok} videos -> {stats.frames} frames, {stats.quarantined} quarantined, "
            f"in {stats.elapsed_s:.1f}s"
        )
        fail_above_rate(shard, stats.quarantined, stats.videos, config.max_failure_rate, "videos", metadata)
        return metadata

    return materialize_each_shard(context, one_shard)


def _metadata(store: ObjectStore, shard: str, result: VideoShardResult) -> dict[str, object]:
    stats = result.stats
    metadata: dict[str, object] = {
        "dagster/row_count": MetadataValue.int(result.index.num_rows),
        "videos": MetadataValue.int(stats.videos),
        "videos_ok": MetadataValue.int(stats.ok),
        "videos_quarantined": MetadataValue.int(stats.quarantined),
        "videos_capped": MetadataValue.int(stats.capped),
        "frames": MetadataValue.int(stats.frames),
        "failure_rate": MetadataValue.float(round(stats.failure_rate, 4)),
        "quarantine_counts": MetadataValue.json(dict(stats.reasons.most_common())),
        "quarantine_reasons": MetadataValue.md(stats.reasons_markdown()),
        "bytes_downloaded": MetadataValue.int(stats.bytes_downloaded),
        "decode_s": MetadataValue.float(round(stats.decode_s, 2)),
        "frames_per_s": MetadataValue.float(round(stats.frames_per_s, 1)),
        "elapsed_s": MetadataValue.float(round(stats.elapsed_s, 2)),
        "index_path": MetadataValue.path(store.uri(layout.video_frames_index(shard))),
    }
    frames = preview_frames(store, shard, result.index, PREVIEW_VIDEOS, PREVIEW_FRAMES_PER_VIDEO)
    if frames:
        sheet = thumbnail_grid(frames, columns=PREVIEW_FRAMES_PER_VIDEO)
        metadata["preview"] = MetadataValue.md(markdown_image(sheet, f"{shard}: frames of the first videos"))
    return metadata
