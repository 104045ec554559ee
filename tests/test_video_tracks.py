"""Video tracking: keyframe detections + a tracker with stable ids (domain), the ``video_tracks`` GPU asset
through a real model worker with the stand-in detector and tracker, ``video_labels`` re-thresholding
without any worker, and tracked frames reaching the AutoSAM2 dataset at the configured stride.

The stand-ins look at pixels: ``fake_blobs`` boxes each flat-coloured shape, the ``fake`` tracker follows
a prompted shape by its colour (``pseudolabel.testing.models``). Scenes come from
``pseudolabel.testing.videos``; nothing here measures tracking quality.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import yaml
from dagster import DagsterInstance, materialize
from PIL import Image, ImageDraw
from worker_helpers import shard_metadata

from assets.autosam2_manifest import autosam2_manifest
from assets.common import SHARDS_PARTITIONS_NAME
from assets.video_labels import video_labels
from assets.video_tracks import video_tracks
from pseudolabel import layout
from pseudolabel.dataset.publish import current_root, split_key
from pseudolabel.labels.thresholds import load_thresholds
from pseudolabel.models.stages import DetectionSettings
from pseudolabel.rle import decode_rle
from pseudolabel.storage import LocalObjectStore, read_parquet
from pseudolabel.testing.models import BlobDetector, FakeTracker
from pseudolabel.testing.videos import MovingShape, render_frame, shape_boxes, write_frames
from pseudolabel.video.tracking import TrackingSettings, match, track_video
from resources.models import DetectorResource, StageSettingsResource, TrackerResource
from resources.storage import LocalStorageResource
from resources.thresholds import ThresholdsResource
from resources.workers import LocalModelWorkers

SIZE = (96, 64)
N = 40
K = 8
RED = MovingShape("box", (230, 30, 30), 0.3, start=(0.2, 0.3), end=(0.8, 0.3))
BLUE = MovingShape("disc", (30, 80, 230), 0.3, start=(0.8, 0.75), end=(0.5, 0.75), enters_at=0.5)
DULL = MovingShape("box", (110, 170, 110), 0.25, start=(0.12, 0.8), end=(0.14, 0.8))  # box score ~0.24
SHARD = "shard-00000"


def scene(shapes, frames=N, vanish=None) -> list[Image.Image]:
    """Frames of ``shapes``; ``vanish=(frame, box)``: a green box drawn on the frames before ``frame``."""
    out = []
    for n in range(frames):
        image = render_frame(n, frames=frames, size=SIZE, shapes=shapes)
        if vanish is not None and n < vanish[0]:
            ImageDraw.Draw(image).rectangle(vanish[1], fill=(30, 200, 30))
        out.append(image)
    return out


def jpegs(images: list[Image.Image]) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def by_track(rows: list[dict]) -> dict[int, dict[int, dict]]:
    tracks: dict[int, dict[int, dict]] = defaultdict(dict)
    for batch in rows:
        for i, track_id in enumerate(batch["track_id"]):
            frame = batch["frame_index"][i]
            assert frame not in tracks[track_id], "one row per (frame, track)"
            tracks[track_id][frame] = {name: values[i] for name, values in batch.items()}
    return tracks


def iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def run_tracking(frames, detector=None, **settings):
    rows, tracker = [], FakeTracker()
    data = jpegs(frames)
    summary = track_video(
        "v1",
        len(data),
        lambda i: data[i],
        detector or BlobDetector(),
        tracker,
        DetectionSettings(),
        TrackingSettings(keyframe_every=K, **settings),
        rows.append,
    )
    return summary, by_track(rows), tracker


def test_ids_are_kept_across_keyframes_a_new_object_gets_a_new_track_and_a_vanished_one_ends():
    green = (40, 40, 56, 52)
    summary, tracks, tracker = run_tracking(scene([RED, BLUE], vanish=(18, green)))
    assert summary.started == 3 and len(tracks) == 3
    red, first_green, blue = (tracks[t] for t in sorted(tracks))
    # The red box: one id over all 40 frames, its mask where the box is (frames <-> masks <-> ids).
    assert sorted(red) == list(range(N))
    for frame, row in red.items():
        truth = shape_boxes(frame, frames=N, size=SIZE, shapes=[RED])[0]
        assert iou((row["x0"], row["y0"], row["x1"], row["y1"]), truth) > 0.7, frame
        mask = decode_rle(row["rle_counts"], row["height"], row["width"])
        assert mask.shape == (SIZE[1], SIZE[0]) and mask.sum() == row["mask_area"]
        assert row["keyframe"] == (frame % K == 0)
    # The green box vanishes at frame 18: its track ends there.
    assert sorted(first_green) == list(range(18)) and summary.ended == 1
    # The disc enters at frame 20, is first detected on keyframe 24, and is tracked back to frame 20.
    assert min(blue) == 20 and max(blue) == N - 1
    assert summary.keyframes == 5 and summary.track_lengths == [18, 40, 20]
    # Bounded memory: the tracker never held more than one window (K + 1 frames).
    assert tracker.max_live_frames <= K + 1 and summary.max_window_frames == K + 1


class MissesRedAfter:
    """The blob detector, blind to the red box from ``frame`` on (as if the detector lost it)."""

    def __init__(self, frame: int) -> None:
        self.inner, self.frame, self.batch_size = BlobDetector(), frame, 1

    def describe(self):
        return self.inner.describe()

    def prepare(self, image_id, data):
        return self.inner.prepare(image_id, data)

    def detect(self, batch, captions, **floors):
        found = self.inner.detect(batch, captions, **floors)
        frame = int(batch[0].image_id.rsplit("/", 1)[1])
        if frame < self.frame:
            return found
        keep = [i for i, box in enumerate(found[0].boxes) if box[1] > 30]  # drop boxes in the top half
        return [found[0].take(np.array(keep, np.int64))]


@pytest.mark.parametrize("max_lost, last_frame", [(0, 15), (1, 23), (3, N - 1)])
def test_a_track_no_detection_matches_ends_after_max_lost_keyframes(max_lost, last_frame):
    """Keyframes 0 and 8 see the red box; from 16 on the detector misses it, so the track is carried
    from its own mask for ``max_lost`` keyframes and then ends (or reaches the end of the video)."""
    summary, tracks, _ = run_tracking(scene([RED]), MissesRedAfter(16), max_lost_keyframes=max_lost)
    (red,) = tracks.values()
    assert min(red) == 0 and max(red) == last_frame
    assert summary.ended == (0 if last_frame == N - 1 else 1)


def test_matching_is_one_to_one_by_highest_iou():
    tracks = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    detections = np.array([[21, 21, 31, 31], [1, 1, 11, 11], [0, 0, 9, 9], [60, 60, 70, 70]], np.float32)
    assert sorted(match(tracks, detections, 0.5)) == [(0, 2), (1, 0)]
    assert match(tracks, detections, 0.99) == []


# ---- through Dagster: the GPU asset in a model worker, then labels and the dataset on the CPU ------------


@pytest.fixture()
def instance():
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [SHARD])
        yield instance


def resources(store, thresholds_path=""):
    return {
        "storage": LocalStorageResource(root=str(store.root)),
        "detector": DetectorResource(backend="fake_blobs"),
        "tracker": TrackerResource(backend="fake"),
        "stage_settings": StageSettingsResource(),
        "model_workers": LocalModelWorkers(),
        "thresholds": ThresholdsResource(path=thresholds_path),
    }


def test_video_tracks_through_a_worker_then_labels_and_dataset_without_one(tmp_path, instance):
    store = LocalObjectStore(tmp_path / "data")
    write_frames(store, SHARD, "vid-a", scene([RED, BLUE, DULL]))
    write_frames(store, SHARD, "vid-b", scene([BLUE], frames=24))
    config = {"ops": {"video_tracks": {"config": {"keyframe_every": K}}}}
    result = materialize(
        [video_tracks], partition_key=SHARD, instance=instance, resources=resources(store), run_config=config
    )
    assert result.success
    meta = shard_metadata(instance, "video_tracks")[SHARD]
    tracks = read_parquet(store, layout.video_tracks(SHARD)).to_pandas()
    assert meta["rows"] == len(tracks) and meta["videos"] == 2 and meta["frames"] == N + 24
    assert meta["tracks"] == meta["tracks_started"] == 4  # red, disc, dull box; vid-b's disc
    assert meta["max_window_frames"] == K + 1 and meta["smoke_run"] is True
    assert meta["tracker_backend"] == "fake" and "preview" in meta and meta["worker"]["pid"]
    per_track = tracks.groupby(["video_id", "track_id"])["frame_index"].agg(["min", "max", "count"])
    assert per_track.loc[("vid-a", 1)].tolist() == [0, N - 1, N]  # the red box, one id throughout
    assert per_track.loc[("vid-b", 1)].tolist() == [12, 23, 12]  # vid-b's disc enters at 12
    provenance = store.get_json(layout.provenance(layout.video_tracks(SHARD)))
    assert provenance["backend"] == "fake" and provenance["detector"]["model"] == "fake_blob_detector"
    tracks_bytes = store.get_bytes(layout.video_tracks(SHARD))

    # Labels: the packaged thresholds drop the dull box (box score ~0.24 < 0.35); no worker involved
    # (the resources below have none).
    no_worker = {k: v for k, v in resources(store).items() if k in ("storage", "thresholds")}
    labelled = materialize([video_labels], partition_key=SHARD, instance=instance, resources=no_worker)
    assert labelled.success
    kept = read_parquet(store, layout.video_labels(SHARD)).to_pandas()
    assert sorted(set(zip(kept["video_id"], kept["track_id"], strict=True))) == [
        ("vid-a", 1),  # red box
        ("vid-a", 3),  # the disc (2 is the dull box, started on frame 0 after the red one)
        ("vid-b", 1),
    ]
    document = json.loads(store.get_bytes(layout.video_labels_json(SHARD)))
    assert [v["length"] for v in document["videos"]] == [N, 24]
    assert document["videos"][0]["file_names"][3] == layout.video_frame(SHARD, "vid-a", 3)
    red = next(a for a in document["annotations"] if a["video_id"] == 1 and a["track_id"] == 1)
    assert len(red["segmentations"]) == N and all(s is not None for s in red["segmentations"])
    disc = next(a for a in document["annotations"] if a["video_id"] == 2)
    assert disc["segmentations"][:12] == [None] * 12 and disc["segmentations"][12]["size"] == [
        SIZE[1],
        SIZE[0],
    ]

    # A looser file re-labels from the stored tracks only: the dull box is kept, the tracks file untouched.
    loose = load_thresholds().to_dict() | {"box_score": 0.1, "text_score": 0.1}
    path = tmp_path / "loose.yaml"
    path.write_text(yaml.safe_dump(loose))
    relabelled = materialize(
        [video_labels],
        partition_key=SHARD,
        instance=instance,
        resources={**no_worker, "thresholds": ThresholdsResource(path=str(path))},
    )
    assert relabelled.success
    loose_meta = relabelled.asset_materializations_for_node("video_labels")[0].metadata
    assert loose_meta["tracks_kept"].value == 4 and loose_meta["rejected_box_score"].value == 0
    assert (
        loose_meta["thresholds_fingerprint"].value
        != labelled.asset_materializations_for_node("video_labels")[0]
        .metadata["thresholds_fingerprint"]
        .value
    )
    assert store.get_bytes(layout.video_tracks(SHARD)) == tracks_bytes

    materialize(
        [video_labels], partition_key=SHARD, instance=instance, resources=no_worker
    )  # back to default
    kept = read_parquet(store, layout.video_labels(SHARD)).to_pandas()

    # The dataset: every 5th labelled frame of each video (no image shards here).
    dataset = materialize(
        [autosam2_manifest],
        instance=instance,
        resources=no_worker,
        run_config={"ops": {"autosam2_manifest": {"config": {"width": 32, "height": 32, "frame_stride": 5}}}},
    )
    assert dataset.success
    root = current_root(store)
    ids = [i for split in ("train", "val", "test") for i in store.get_text(split_key(root, split)).split()]
    labelled_frames = kept[["video_id", "frame_index"]].drop_duplicates().groupby("video_id").size()
    expected = {"vid-a": -(-labelled_frames["vid-a"] // 5), "vid-b": -(-labelled_frames["vid-b"] // 5)}
    assert len(ids) == sum(expected.values())
    assert "vid-a-f000000" in ids and "vid-a-f000005" in ids and "vid-a-f000001" not in ids
    manifest = [json.loads(line) for line in store.get_text(f"{root}/manifest.jsonl").splitlines()]
    assert {m["segmenter_backend"] for m in manifest} == {"fake"}
    coco = json.loads(store.get_bytes(f"{root}/coco.json"))
    assert {image["file_name"] for image in coco["images"]} >= {layout.video_frame(SHARD, "vid-a", 0)}
    meta = dataset.asset_materializations_for_node("autosam2_manifest")[0].metadata
    assert meta["video_frame_samples"].value == len(ids)
    frames = pd.DataFrame([i.rsplit("-f", 1) for i in ids], columns=["video", "frame"]).astype({"frame": int})
    assert (frames.loc[frames["video"] == "vid-a", "frame"] % 5 == 0).all()  # labelled from frame 0 on
    assert sorted(frames.loc[frames["video"] == "vid-b", "frame"]) == [
        12,
        17,
        22,
    ]  # from its first labelled frame


def test_a_shard_without_videos_starts_no_worker_and_labels_nothing(tmp_path, instance):
    """The shard chain runs video_tracks on every shard: an image-only shard must cost no model load."""
    store = LocalObjectStore(tmp_path / "data")
    write_frames(store, SHARD, "vid-a", scene([RED], frames=4))
    index = read_parquet(store, layout.video_frames_index(SHARD)).to_pandas()
    store.put_bytes(  # what video_frames writes for a shard whose items are all images: an empty index
        layout.video_frames_index(SHARD), index.iloc[:0].to_parquet(index=False)
    )
    # No worker: a model_workers resource that fails the test if it is asked to run anything.
    result = materialize(
        [video_tracks, video_labels],
        partition_key=SHARD,
        instance=instance,
        resources={**resources(store), "model_workers": LocalModelWorkers(python="/nonexistent/python")},
    )
    assert result.success
    assert read_parquet(store, layout.video_tracks(SHARD)).num_rows == 0
    assert read_parquet(store, layout.video_labels(SHARD)).num_rows == 0
    assert shard_metadata(instance, "video_tracks")[SHARD]["videos"] == 0
    logs = [e.message or "" for e in instance.all_logs(result.run_id)]
    assert any("no model worker started" in line for line in logs)


def test_video_tracks_before_video_frames_fails_once_with_what_to_do(tmp_path, instance):
    store = LocalObjectStore(tmp_path / "data")
    result = materialize(
        [video_tracks],
        partition_key=SHARD,
        instance=instance,
        resources=resources(store),
        raise_on_error=False,
    )
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "materialize video_frames first" in failure.description
