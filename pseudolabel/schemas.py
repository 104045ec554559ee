"""Column contracts of the Parquet tables passed between stages.

Each stage writes exactly these columns (extra columns allowed) so the next stage can rely on them.
Boxes are always in *original, EXIF-upright* image pixels, xyxy, float.
"""

from __future__ import annotations

import pyarrow as pa

# catalog/<snapshot>/part-*.parquet and every catalog batch.
CATALOG_ROWS = pa.schema(
    [
        ("url", pa.string()),
        ("label", pa.string()),
        ("source_id", pa.string()),  # the catalog's own id when it has one, else null
    ]
)

SAMPLE = pa.schema(
    [
        ("image_id", pa.string()),
        ("url", pa.string()),
        ("label", pa.string()),
        ("shard", pa.string()),
        ("source_id", pa.string()),  # the catalog's own id, when it reports one
        ("sample_key", pa.uint64()),  # seeded hash that orders the sample
    ]
)

IMAGE_INDEX = pa.schema(
    [
        ("image_id", pa.string()),
        ("url", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),  # after EXIF rotation
        ("height", pa.int32()),
        ("original_orientation", pa.int8()),  # EXIF tag value 1..8 (1 when absent)
        ("bytes", pa.int64()),  # size of the stored JPEG
        ("sha256", pa.string()),  # of the stored JPEG
        ("status", pa.string()),  # "ok" | "quarantined"
        ("error", pa.string()),  # reason when quarantined
    ]
)

# detections/<shard>.parquet: one row per candidate box, sorted by (image_id, box_score desc).
DETECTIONS = pa.schema(
    [
        ("image_id", pa.string()),
        ("candidate_id", pa.int32()),  # 0..n-1 within an image, in score order
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        # Scores: what each means depends on the detector backend (README, "Backends"); NaN = the backend
        # does not produce this score, so thresholds on it do not apply and policies needing it refuse.
        ("box_score", pa.float32()),  # Grounding DINO: max token logit (sigmoid) over the caption
        ("text_score", pa.float32()),  # Grounding DINO: score of the phrase's tokens
        ("phrase", pa.string()),
        # The detector's output order, which the both_scores_agree pick policy scans in: the Grounding
        # DINO decoder query the box came from (0..num_queries-1). With one prompt per class the
        # captions' candidates are merged, so it is caption_index * num_queries + query, i.e. caption
        # order, then query order within a caption. Unique within an image; not related to score. Shards
        # written before it existed lack it: readers treat it as optional (see labels/relabel.py).
        ("query_index", pa.int32()),
        # The segmenter's prompt beyond (or instead of) the box: clicks in original-image pixels as
        # flattened [x0, y0, x1, y1, ...] with one label each (1 = object, 0 = background); empty = none.
        # box_prompt False = the box is only the region's extent and is not given to the segmenter
        # (click-only prompts). Shards written before these existed read as box prompts without clicks.
        ("box_prompt", pa.bool_()),
        ("points", pa.list_(pa.float32())),
        ("point_labels", pa.list_(pa.int8())),
    ]
)

# detections/<shard>.images.parquet: one row per image, including zero-candidate images.
DETECTION_IMAGES = pa.schema(
    [
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_candidates", pa.int32()),
    ]
)

# masks/<shard>.parquet: one row per candidate (same image_id, candidate_id as detections).
MASKS = pa.schema(
    [
        ("image_id", pa.string()),
        ("candidate_id", pa.int32()),
        ("rle_counts", pa.string()),  # COCO compressed RLE (pycocotools), utf-8
        ("height", pa.int32()),  # RLE size
        ("width", pa.int32()),
        ("mask_area", pa.int64()),  # pixels
        ("mask_x", pa.float32()),  # mask bbox, COCO xywh
        ("mask_y", pa.float32()),
        ("mask_w", pa.float32()),
        ("mask_h", pa.float32()),
        ("mask_score", pa.float32()),  # SAM2 predicted IoU of the chosen mask
        ("multimask_index", pa.int8()),  # chosen of 3 when multimask, else 0
        ("multimask_scores", pa.list_(pa.float32())),  # all predicted IoUs (len 1 or 3)
    ]
)

# pseudo_labels/<shard>.parquet: one row per kept instance, sorted by (image_id, rank).
PSEUDO_LABELS = pa.schema(
    [
        ("image_id", pa.string()),
        ("candidate_id", pa.int32()),
        ("rank", pa.int32()),  # 0.. within the image, by detector score
        ("phrase", pa.string()),
        ("x0", pa.float32()),  # detector box, xyxy, original upright pixels
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("box_score", pa.float32()),
        ("text_score", pa.float32()),
        ("mask_score", pa.float32()),
        ("rle_counts", pa.string()),  # COCO compressed RLE
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_area", pa.int64()),
        ("mask_x", pa.float32()),  # mask bbox, COCO xywh
        ("mask_y", pa.float32()),
        ("mask_w", pa.float32()),
        ("mask_h", pa.float32()),
        ("area_fraction", pa.float32()),  # mask_area / image area
        ("box_coverage", pa.float32()),  # clipped box area / image area
        ("thresholds_fingerprint", pa.string()),
    ]
)

# video_frames/<shard>.parquet: one row per stored frame of each video of the shard, plus one row per
# quarantined video (frame_index -1, status = the reason). Frames are upright RGB JPEGs at
# video_frames/<shard>/<video_id>/<frame_index:06d>.jpg, frame_index 0.. in time order.
VIDEO_FRAMES = pa.schema(
    [
        ("video_id", pa.string()),  # image_id_for_url(url): videos and images share one id space
        ("url", pa.string()),
        ("label", pa.string()),
        ("frame_index", pa.int32()),  # 0.. among the stored frames; -1 on a quarantined video's row
        ("source_frame", pa.int32()),  # index of the frame in the decoded stream (or frame list)
        ("timestamp_s", pa.float64()),
        ("width", pa.int32()),  # upright size (after the container's rotation)
        ("height", pa.int32()),
        ("sha256", pa.string()),  # of the stored JPEG
        ("status", pa.string()),  # "ok" or the quarantine reason
        ("detail", pa.string()),
    ]
)

# video_tracks/<shard>.parquet: one row per (video, frame, track) the tracker followed, every track kept
# (the video_labels stage thresholds them). Written by the model worker as it goes, so rows are grouped
# by keyframe interval, not sorted; readers sort by (video_id, frame_index, track_id).
VIDEO_TRACKS = pa.schema(
    [
        ("video_id", pa.string()),
        ("frame_index", pa.int32()),  # VIDEO_FRAMES.frame_index: video_frames/<shard>/<video_id>/<n>.jpg
        ("track_id", pa.int32()),  # 1.. within a video; kept across keyframes while detections re-match it
        ("phrase", pa.string()),  # of the detection that started the track
        ("x0", pa.float32()),  # the mask's box, xyxy, upright frame pixels
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("box_score", pa.float32()),  # of the detection that started the track
        ("text_score", pa.float32()),
        ("match_box_score", pa.float32()),  # of the detection that last re-matched it (= box_score at start)
        (
            "mask_score",
            pa.float32(),
        ),  # tracker's confidence in this frame (SAM2: object-presence probability)
        ("rle_counts", pa.string()),  # COCO compressed RLE of the frame's mask
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_area", pa.int64()),
        ("keyframe", pa.bool_()),  # a detector keyframe (prompts and matching happen there)
    ]
)

# video_labels/<shard>.parquet: the VIDEO_TRACKS rows kept by the thresholds, plus per-track summary
# columns; video_labels/<shard>.vis.json holds the same as YouTube-VIS style JSON.
VIDEO_LABELS = pa.schema(
    list(VIDEO_TRACKS)
    + [
        ("track_mean_mask_score", pa.float32()),
        ("area_fraction", pa.float32()),  # mask_area / frame area
        ("thresholds_fingerprint", pa.string()),
    ]
)

# reviewed/labels.parquet: one row per reviewed instance.
REVIEWED_LABELS = pa.schema(
    [
        ("image_id", pa.string()),
        ("shard", pa.string()),
        ("task_id", pa.int64()),  # Label Studio task
        ("annotation_id", pa.int64()),
        ("outcome", pa.string()),  # accepted | corrected | rejected | added (review/corrections.py)
        ("candidate_id", pa.int32()),  # the chain's candidate; -1 for an added instance
        ("pipeline_kept", pa.bool_()),  # the chain kept the candidate (False: shown as a dropped one)
        ("uniform_sample", pa.bool_()),  # the image was in the queue's uniform random sample (unbiased)
        ("phrase", pa.string()),  # the class (the reviewer's, for corrected and added instances)
        ("predicted_phrase", pa.string()),  # the class the chain gave it (null for an added instance)
        ("iou_with_prediction", pa.float32()),  # reviewer's mask vs the shown one: 1 accepted, 0 rejected
        ("rle_counts", pa.string()),  # COCO compressed RLE
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("mask_area", pa.int64()),
        ("reviewer", pa.string()),
        ("reviewed_at", pa.string()),  # the annotation's updated_at (ISO 8601)
    ]
)
