"""``video_labels``: one shard's stored tracks re-thresholded into video labels, on the CPU.

The thresholds come from the ``thresholds`` resource when the step runs, and the definitions stamp
their fingerprint on this asset as its ``code_version`` (like ``pseudo_labels``), so a threshold edit
marks every shard unsynced and re-materialising re-reads stored tracks, never the tracker.
"""

# No `from __future__ import annotations`: Dagster 1.13 must resolve the Config annotation when decorating.
import time

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from assets.common import SINGLE_RUN, shard_partitions
from pseudolabel import layout
from pseudolabel.labels.coco import category_names, coco_to_bytes
from pseudolabel.storage import ObjectNotFound, read_parquet, write_parquet
from pseudolabel.video.track_labels import TRACK_REJECT_REASONS, label_tracks, video_sizes, vis_json
from resources.storage import StorageResource
from resources.thresholds import ThresholdsResource


@asset(
    partitions_def=shard_partitions,
    backfill_policy=SINGLE_RUN,
    deps=["video_tracks"],
    group_name="labels",
    kinds={"parquet", "json"},
    description=(
        "Thresholded video tracks per shard: video_labels/<shard>.parquet and .vis.json (YouTube-VIS "
        "style, RLE per frame, track ids as instance ids). The thresholds file's fingerprint is the code version."
    ),
)
def video_labels(
    context: AssetExecutionContext, storage: StorageResource, thresholds: ThresholdsResource
) -> MaterializeResult:
    store = storage.store()
    rules = thresholds.load()
    started = time.perf_counter()
    totals = {"tracks": 0, "tracks_kept": 0, "frames_labelled": 0, "rows_kept": 0, "videos": 0}
    rejected = dict.fromkeys(TRACK_REJECT_REASONS, 0)
    fingerprint, smoke = "", False
    for shard in context.partition_keys:
        tracks = read_parquet(store, layout.video_tracks(shard)).to_pandas()
        videos = video_sizes(read_parquet(store, layout.video_frames_index(shard)).to_pandas())
        labels = label_tracks(tracks, rules)
        fingerprint = labels.fingerprint
        try:
            provenance = store.get_json(layout.provenance(layout.video_tracks(shard)))
        except ObjectNotFound:
            provenance = {}
        smoke = smoke or bool(provenance.get("smoke_run") or provenance.get("detector", {}).get("smoke_run"))
        info = {"shard": shard, "thresholds_fingerprint": fingerprint, "thresholds": rules.to_dict()}
        info["smoke_run"] = smoke
        document = vis_json(
            labels.kept,
            videos,
            lambda video_id, n, s=shard: layout.video_frame(s, video_id, n),
            categories=category_names(tracks["phrase"]) if len(tracks) else [],
            info=info,
        )
        write_parquet(store, layout.video_labels(shard), labels.table())
        store.put_bytes(layout.video_labels_json(shard), coco_to_bytes(document))
        totals["tracks"] += labels.tracks_in
        totals["tracks_kept"] += labels.tracks_kept
        totals["rows_kept"] += len(labels.kept)
        totals["frames_labelled"] += len(labels.kept[["video_id", "frame_index"]].drop_duplicates())
        totals["videos"] += len(videos)
        for reason, count in labels.rejected.items():
            rejected[reason] += count
        context.log.info(f"{shard}: kept {labels.tracks_kept} of {labels.tracks_in} tracks ({fingerprint})")
    first = context.partition_keys[0]
    metadata = {
        "dagster/row_count": MetadataValue.int(totals["rows_kept"]),
        **{name: MetadataValue.int(value) for name, value in totals.items()},
        **{f"rejected_{reason}": MetadataValue.int(count) for reason, count in rejected.items()},
        "thresholds_fingerprint": MetadataValue.text(fingerprint),
        "thresholds": MetadataValue.json(rules.to_dict()),
        "smoke_run": MetadataValue.bool(smoke),
        "relabel_s": MetadataValue.float(round(time.perf_counter() - started, 3)),
        "parquet": MetadataValue.path(store.uri(layout.video_labels(first))),
        "vis_json": MetadataValue.path(store.uri(layout.video_labels_json(first))),
    }
    return MaterializeResult(metadata=metadata)
