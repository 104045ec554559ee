"""``video_tracks``: detector keyframes + SAM2 video tracking over every video of a shard, in a model
worker (GPU). One row per (video, frame, track) with its COCO RLE mask: video_tracks/<shard>.parquet."""

from dagster import AssetExecutionContext, Failure, MaterializeResult, MetadataValue, asset

from assets.common import GpuStageConfig, gpu_shard_asset_args
from pseudolabel.storage import ObjectNotFound
from pseudolabel.video.tracking import TRACKING_VERSION, TrackingSettings
from pseudolabel.video.tracks_table import shard_has_videos, write_no_tracks
from pseudolabel.workers.task import VIDEO_TRACKS, WorkerTask
from resources.models import DetectorResource, StageSettingsResource, TrackerResource
from resources.storage import StorageResource
from resources.workers import ModelWorkersResource


class VideoTracksConfig(GpuStageConfig):
    # Detector keyframes (and the tracker's window) every K frames.
    keyframe_every: int = TrackingSettings.keyframe_every
    # A keyframe detection continues a track when its box IoU with the track is at least this.
    match_iou: float = TrackingSettings.match_iou
    # Unmatched keyframes in a row before a track ends.
    max_lost_keyframes: int = TrackingSettings.max_lost_keyframes
    # Track objects that appear mid-video back to the previous keyframe.
    backward: bool = TrackingSettings.backward


@asset(
    **gpu_shard_asset_args(),
    deps=["video_frames"],
    code_version=TRACKING_VERSION,
    kinds={"pytorch", "parquet"},
)
def video_tracks(
    context: AssetExecutionContext,
    config: VideoTracksConfig,
    storage: StorageResource,
    detector: DetectorResource,
    tracker: TrackerResource,
    stage_settings: StageSettingsResource,
    model_workers: ModelWorkersResource,
) -> MaterializeResult:
    """Every object the detector finds on keyframes (prompt and floors: ``stage_settings``), followed
    through each video by the ``tracker`` with a stable track id: one row per (video, frame, track)
    with box, scores and COCO RLE mask. Every track is kept; ``video_labels`` applies the thresholds.
    One model load serves every shard of the run."""
    try:
        tracking = TrackingSettings(
            keyframe_every=config.keyframe_every,
            match_iou=config.match_iou,
            max_lost_keyframes=config.max_lost_keyframes,
            backward=config.backward,
        )
    except ValueError as exc:  # bad configuration: fail once, before any worker starts
        raise Failure(description=f"video_tracks: {exc}", allow_retries=False) from exc
    store = storage.store()
    try:
        with_videos = [shard for shard in context.partition_keys if shard_has_videos(store, shard)]
    except ObjectNotFound as exc:
        raise Failure(
            description=f"video_tracks: {exc}; materialize video_frames first", allow_retries=False
        ) from exc
    for shard in context.partition_keys:  # no video, no model worker: an empty table, in milliseconds
        if shard not in with_videos:
            key = write_no_tracks(store, shard)
            context.add_asset_metadata(
                {"videos": 0, "tracks": 0, "path": MetadataValue.path(store.uri(key))}, partition_key=shard
            )
    if not with_videos:
        context.log.info("no videos in these shards: no model worker started")
        return MaterializeResult()
    task = WorkerTask(
        stage=VIDEO_TRACKS,
        shards=with_videos,
        storage=storage.location(),
        settings={"detections": vars(stage_settings.detection()), "tracking": vars(tracking)},
        detector=detector.spec().for_retry(context.retry_number).to_dict(),
        tracker=tracker.spec().to_dict(),
        force=config.force,
    )
    model_workers.run(context, task, storage.worker_env())  # metadata goes onto each shard
    return MaterializeResult()
