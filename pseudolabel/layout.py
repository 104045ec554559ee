"""Every storage key the pipeline reads or writes, built in one place.

catalog/CURRENT.json                      pointer to the latest snapshot (written last)
catalog/<snapshot_id>/part-00000.parquet  snapshot chunks: url, label, source_id
sample/sample.parquet                     the stratified sample: image_id, url, label, shard, ...
images/<shard>/<image_id>.jpg             EXIF-normalised RGB JPEGs
images/<shard>.parquet                    per-shard image index (status, sha256, ...)
images/<shard>.parts/<n>.parquet          index rows of a run still in progress (or killed); merged
                                          into images/<shard>.parquet and deleted when it finishes
detections/<shard>.parquet                Grounding DINO candidates, one row per box
detections/<shard>.images.parquet         one row per image (size, candidate count)
detections/<shard>.masks.parquet          the detector's own masks (SAM 3), as masks/ rows; absent otherwise
masks/<shard>.parquet                     SAM2 masks (COCO RLE), one row per candidate
pseudo_labels/<shard>.parquet             kept instances after thresholds
pseudo_labels/<shard>.coco.json           the same as COCO
video_frames/<shard>/<video_id>/<n>.jpg   upright RGB frames of each video, n = frame_index:06d
video_frames/<shard>.parquet              per-shard frame index (one row per frame; quarantined videos)
video_tracks/<shard>.parquet              tracked masks (COCO RLE), one row per (video, frame, track)
video_labels/<shard>.parquet|.vis.json    thresholded tracks: Parquet index + YouTube-VIS style JSON
autosam2/...                              the AutoSAM2 training layout
exports/...                               the dataset exports (COCO, YOLO-seg, Label Studio tasks)
label_quality/...                         evaluation reports
"""

from __future__ import annotations

SHARD_PREFIX = "shard-"

CATALOG_CURRENT = "catalog/CURRENT.json"
SAMPLE = "sample/sample.parquet"
AUTOSAM2_ROOT = "autosam2"
LABEL_QUALITY_ROOT = "label_quality"


def shard_name(index: int) -> str:
    """Dynamic-partition key of shard number ``index``: ``shard-00000``."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"{SHARD_PREFIX}{index:05d}"


def catalog_snapshot_dir(snapshot_id: str) -> str:
    return f"catalog/{snapshot_id}"


def catalog_part(snapshot_id: str, part: int) -> str:
    return f"{catalog_snapshot_dir(snapshot_id)}/part-{part:05d}.parquet"


def image(shard: str, image_id: str) -> str:
    return f"images/{shard}/{image_id}.jpg"


def images_dir(shard: str) -> str:
    return f"images/{shard}/"


def image_index(shard: str) -> str:
    return f"images/{shard}.parquet"


def image_index_parts_dir(shard: str) -> str:
    return f"images/{shard}.parts/"


def image_index_part(shard: str, number: int) -> str:
    return f"{image_index_parts_dir(shard)}{number:06d}.parquet"


def image_index_part_number(key: str) -> int | None:
    """``images/shard-00000.parts/000012.parquet`` -> 12; None for anything else."""
    stem = key.rsplit("/", 1)[-1].removesuffix(".parquet")
    return int(stem) if stem.isdigit() and key.endswith(".parquet") else None


def image_step_prefixes(shard: str) -> tuple[str, ...]:
    """Every key ``normalized_images`` writes for ``shard`` starts with one of these."""
    return (images_dir(shard), image_index_parts_dir(shard), image_index(shard))


def detections(shard: str) -> str:
    return f"detections/{shard}.parquet"


def detection_images(shard: str) -> str:
    return f"detections/{shard}.images.parquet"


def detection_masks(shard: str) -> str:
    """The masks a detector made with its boxes (SAM 3), in the MASKS schema; the masks stage's segmenter
    backend "detector" copies them to :func:`masks`. Written only by detectors that make masks."""
    return f"detections/{shard}.masks.parquet"


def masks(shard: str) -> str:
    return f"masks/{shard}.parquet"


def provenance(stage_key: str) -> str:
    """What produced a GPU stage's output (model identity, backend, settings, fingerprint), written by
    the worker just before the output: ``detections/shard-00000.parquet`` -> ``....meta.json``."""
    return stage_key.removesuffix(".parquet") + ".meta.json"


def video_frame(shard: str, video_id: str, frame_index: int) -> str:
    return f"video_frames/{shard}/{video_id}/{frame_index:06d}.jpg"


def video_frames_index(shard: str) -> str:
    return f"video_frames/{shard}.parquet"


def video_tracks(shard: str) -> str:
    return f"video_tracks/{shard}.parquet"


def video_labels(shard: str) -> str:
    return f"video_labels/{shard}.parquet"


def video_labels_json(shard: str) -> str:
    return f"video_labels/{shard}.vis.json"


def pseudo_labels(shard: str) -> str:
    return f"pseudo_labels/{shard}.parquet"


def pseudo_labels_coco(shard: str) -> str:
    return f"pseudo_labels/{shard}.coco.json"


def pseudo_labels_polygons(shard: str) -> str:
    return f"pseudo_labels/{shard}.polygons.coco.json"


# The AutoSAM2 dataset: autosam2/CURRENT.json names the live version's root.
AUTOSAM2_CURRENT = f"{AUTOSAM2_ROOT}/CURRENT.json"


def autosam2_version_root(version: str) -> str:
    return f"{AUTOSAM2_ROOT}/versions/{version}"


def autosam2_sample(root: str, image_id: str) -> str:
    return f"{root}/samples/{image_id}.jpg"


def autosam2_binary_mask(root: str, image_id: str) -> str:
    return f"{root}/binary_masks/{image_id}_binarymask.jpg"


def autosam2_split(root: str, split: str) -> str:
    return f"{root}/splits/{split}.txt"


PROPOSAL_NAME = "thresholds.proposal.yaml"


def label_quality_proposal(prefix: str) -> str:
    """The thresholds a label_quality run proposes per class, as a thresholds file."""
    return f"{prefix}/{PROPOSAL_NAME}"


def label_quality_gold_image(prefix: str, image_id: str) -> str:
    """A gold image as the evaluation's model worker reads it (bytes as stored on disk)."""
    return f"{prefix}/gold/{image_id}"


def label_quality_candidates(prefix: str, table: str) -> str:
    """``detections`` / ``detection_images`` / ``masks`` of the gold images, as the chain stores them."""
    return f"{prefix}/candidates/{table}.parquet"


# The review loop: what was sent to Label Studio, and what reviewers said.
REVIEWED_LABELS = "review/reviewed_labels.parquet"  # one row per reviewed instance (schemas.REVIEWED_LABELS)
REVIEW_STATE = "review/state.json"  # Label Studio project id and the reviewed-until cursor


def review_queue(version: str) -> str:
    """The queue one review_queue run chose and pushed (image, class, reason, candidate)."""
    return f"review/queues/{version}.parquet"


# Dataset exports: exports/CURRENT.json names the live version's root; each version holds every format.
EXPORTS_ROOT = "exports"
EXPORTS_CURRENT = f"{EXPORTS_ROOT}/CURRENT.json"


def exports_version_root(version: str) -> str:
    return f"{EXPORTS_ROOT}/versions/{version}"


def export_image(root: str, split: str, image_id: str) -> str:
    """The image file COCO and YOLO share: ``images/<split>/<image_id>.jpg``."""
    return f"{root}/images/{split}/{image_id}.jpg"


def export_coco(root: str, split: str) -> str:
    return f"{root}/annotations/instances_{split}.json"


def export_yolo_labels(root: str, split: str, image_id: str) -> str:
    return f"{root}/labels/{split}/{image_id}.txt"


def export_data_yaml(root: str) -> str:
    return f"{root}/data.yaml"


def export_label_studio_tasks(root: str, split: str) -> str:
    return f"{root}/label_studio/tasks_{split}.json"


def export_label_studio_config(root: str) -> str:
    """The labelling config the tasks were made for (import it as the project's config)."""
    return f"{root}/label_studio/label_config.xml"
