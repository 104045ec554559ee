"""``normalized_images``: one shard of the sample as upright RGB JPEGs plus a per-shard index."""

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
from pseudolabel.images.normalize import DEFAULT_MAX_SIDE, NormalizeOptions
from pseudolabel.images.shard import ShardOptions, ShardResult, process_shard, usable_cpus
from pseudolabel.markdown import markdown_image
from pseudolabel.preview import shard_thumbnails, thumbnail_grid
from pseudolabel.storage import ObjectStore, read_parquet
from resources.storage import StorageResource

PREVIEW_IMAGES = 8


class NormalizedImagesConfig(Config):
    concurrency: int = Field(default=32, description="Simultaneous downloads.")
    timeout_s: float = Field(default=30.0, description="Deadline per download attempt (connect + body).")
    max_retries: int = Field(
        default=3, description="Retries after 5xx / 429 / timeouts / dropped connections."
    )
    max_bytes: int = Field(
        default=50 * 1024 * 1024, description="Larger bodies are quarantined as too_large."
    )
    max_pixels: int = Field(default=100_000_000, description="Decompression-bomb limit (width x height).")
    jpeg_quality: int = Field(default=95, description="Quality of the stored JPEGs.")
    # 2048: the models resize anyway (Grounding DINO 800 short / 1333 long side, SAM2 1024, AutoSAM2
    # 512), so this keeps headroom above all of them while a 12 MP photo stores ~4x fewer pixels.
    # Every downstream box is in stored pixels, so the index records the stored (scaled) size.
    max_side: int = Field(
        default=DEFAULT_MAX_SIDE,
        description="Longer side of the stored images, px: larger ones are scaled down (0: full resolution).",
    )
    max_failure_rate: float = Field(
        default=0.2, description="Fail the shard above this quarantined fraction."
    )
    decode_workers: int | None = Field(
        default=None,
        description="Decode/encode threads (default: the CPUs this process may use: affinity, cgroup quota).",
    )
    progress_every: int = Field(default=100, description="Log progress every N downloaded images.")

    def shard_options(self) -> ShardOptions:
        return ShardOptions(
            download=DownloadPolicy(
                concurrency=self.concurrency,
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
                max_bytes=self.max_bytes,
            ),
            normalize=NormalizeOptions(
                max_pixels=self.max_pixels, jpeg_quality=self.jpeg_quality, max_side=self.max_side
            ),
            decode_workers=self.decode_workers or usable_cpus(),
            progress_every=self.progress_every,
        )


@asset(
    partitions_def=shard_partitions,
    retry_policy=network_retry(),
    backfill_policy=shards_per_run(),
    deps=["stratified_sample"],
    group_name="images",
    description=(
        "The shard's sampled images downloaded, EXIF-rotated upright, converted to RGB and stored as "
        "JPEG under images/<shard>/; images/<shard>.parquet indexes them (bad ones quarantined with a reason). "
        "Video items (video files, frame prefixes) are skipped and counted: they are video_frames' work."
    ),
)
def normalized_images(
    context: AssetExecutionContext, config: NormalizedImagesConfig, storage: StorageResource
) -> MaterializeResult:
    """One shard per partition; a backfill run takes a range of shards, one after the other, each with
    its own materialization."""
    store = storage.store()
    sample = read_parquet(store, layout.SAMPLE, columns=SAMPLE_COLUMNS)

    def one_shard(shard: str) -> dict[str, object]:
        stale = _remove_stale_temp(context, store, shard)
        items, videos = split_videos(shard_items(sample, shard))
        context.log.info(f"{shard}: {len(items)} sampled images")
        if videos:  # video files and frame prefixes are video_frames' work: not downloaded here
            context.log.info(f"{shard}: skipped {len(videos)} video items (see video_frames)")
        # Writes the index (before any failure below, so a failure loses nothing) and records
        # progress as it goes; a rerun after a crash reuses every stored image and fetches only the rest.
        result = process_shard(store, shard, items, config.shard_options(), progress=context.log.info)
        metadata = _metadata(store, shard, result, stale, videos_skipped=len(videos))
        stats = result.stats
        hint = ": stored images are reused"
        fail_above_rate(
            shard, stats.quarantined, stats.total, config.max_failure_rate, "images", metadata, hint
        )
        return metadata

    return materialize_each_shard(context, one_shard)


def _remove_stale_temp(context: AssetExecutionContext, store: ObjectStore, shard: str) -> int:
    """Clean what killed writers left half-written under this step's own keys: best effort (an S3
    policy without ListBucketMultipartUploads / AbortMultipartUpload must not stop the shard)."""
    try:
        stale = sum(store.remove_stale_temp(prefix) for prefix in layout.image_step_prefixes(shard))
    except Exception as exc:
        context.log.warning(f"{shard}: could not look for stale temp files: {type(exc).__name__}: {exc}")
        return 0
    if stale:
        context.log.info(f"{shard}: removed {stale} stale temp file(s) / incomplete upload(s)")
    return stale


def _metadata(
    store: ObjectStore, shard: str, result: ShardResult, stale_temp: int, videos_skipped: int
) -> dict[str, object]:
    stats = result.stats
    metadata: dict[str, object] = {
        "dagster/row_count": MetadataValue.int(result.index.num_rows),
        "images_ok": MetadataValue.int(stats.ok),
        "images_quarantined": MetadataValue.int(stats.quarantined),
        "images_reused": MetadataValue.int(stats.reused),
        "images_fetched": MetadataValue.int(stats.fetched),
        "videos_skipped": MetadataValue.int(videos_skipped),  # left to video_frames, not quarantined
        # Rows taken over without a download: from the last index, or recorded by a killed run...
        "reused_from_unfinished_run": MetadataValue.int(result.recovered),
        # ...or stored images no index recorded (a kill or storage outage before the part was written).
        "rebuilt_from_stored_images": MetadataValue.int(result.rebuilt),
        "stale_temp_files_removed": MetadataValue.int(stale_temp),
        "failure_rate": MetadataValue.float(round(stats.failure_rate, 4)),
        "quarantine_counts": MetadataValue.json(dict(stats.reasons.most_common())),
        "quarantine_reasons": MetadataValue.md(stats.reasons_markdown()),
        "orientation_histogram": MetadataValue.json(
            {str(k): v for k, v in sorted(stats.orientations.items())}
        ),
        "bytes_downloaded": MetadataValue.int(stats.bytes_downloaded),
        "bytes_stored": MetadataValue.int(stats.bytes_stored),
        "elapsed_s": MetadataValue.float(round(stats.elapsed_s, 2)),
        "images_per_s": MetadataValue.float(round(stats.images_per_s, 1)),
        "index_path": MetadataValue.path(store.uri(layout.image_index(shard))),
    }
    thumbnails = shard_thumbnails(store, shard, result.index, limit=PREVIEW_IMAGES)
    if thumbnails:
        sheet = thumbnail_grid(thumbnails)
        metadata["preview"] = MetadataValue.md(
            markdown_image(sheet, f"{shard}: first {len(thumbnails)} images")
        )
    return metadata
