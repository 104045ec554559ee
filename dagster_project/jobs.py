"""Jobs users launch from the UI, schedules and sensors."""

from dagster import AssetSelection, define_asset_job

from assets.common import shard_partitions

SHARD_CHAIN = [
    *("normalized_images", "detections", "masks", "pseudo_labels"),
    *("video_frames", "video_tracks", "video_labels"),  # shards without videos pass in milliseconds
]

# Full refresh of the catalog and the sample (also what `pseudolabel demo` starts with).
catalog_job = define_asset_job(
    "catalog_job",
    selection=AssetSelection.assets("catalog_snapshot", "stratified_sample"),
    description="Snapshot the catalog and draw the stratified sample (registers shards).",
)

# Sample only catalog items beyond the cursor; launched by the refresh schedule and growth sensor.
sample_increment_job = define_asset_job(
    "sample_increment_job",
    selection=AssetSelection.assets("stratified_sample"),
    description="Sample catalog items past the last cursor with the same rules; registers new shards.",
)

# Everything one shard needs, GPU steps included: one run per shard.
shard_chain_job = define_asset_job(
    "shard_chain_job",
    selection=AssetSelection.assets(*SHARD_CHAIN),
    partitions_def=shard_partitions,
    description="Download (images and video frames), detect, segment, track and label one shard.",
)

# Re-threshold stored candidates only; never touches the GPU stages.
relabel_job = define_asset_job(
    "relabel_job",
    selection=AssetSelection.assets("pseudo_labels", "video_labels"),
    partitions_def=shard_partitions,
    description="Re-apply thresholds to stored detections/masks and video tracks (CPU only).",
)

dataset_job = define_asset_job(
    "dataset_job",
    selection=AssetSelection.assets("autosam2_manifest", "dataset_exports"),
    description=(
        "Publish a new dataset version from every labelled shard: the AutoSAM2 layout, then the COCO, "
        "YOLO-seg and Label Studio exports with the same splits (stopped by a failing quality gate)."
    ),
)

review_job = define_asset_job(
    "review_job",
    selection=AssetSelection.assets("review_queue"),
    description="Choose images for review and push them to the Label Studio project (CPU only).",
)
