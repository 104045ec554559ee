"""Videos in the catalog: recognising them, decoding upright frames at a rate, the video_frames asset
(served by the real local HTTP server, both storage backends), and normalized_images leaving them alone."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

import av
import numpy as np
import pyarrow as pa
import pytest
from images import images_metadata, materialize_images
from PIL import Image

from assets.video_frames import VideoFramesConfig, video_frames
from pseudolabel import layout
from pseudolabel.ids import image_id_for_url
from pseudolabel.images.download import DownloadPolicy, ImageFetcher
from pseudolabel.media import MediaKind, media_kind
from pseudolabel.schemas import SAMPLE, VIDEO_FRAMES
from pseudolabel.storage import read_parquet, write_parquet
from pseudolabel.testing.servers import Fault
from pseudolabel.testing.videos import render_frame, shape_boxes, synthetic_video, write_frames
from pseudolabel.video.decode import DecodeOptions, VideoRejected, decode_video
from pseudolabel.video.frames import parse_listing

SHARD = "shard-00000"
SIZE = (96, 64)  # upright; not square, so a frame left lying on its side has the wrong size
CLIP = {"frames": 24, "fps": 8, "size": SIZE}  # 3 s


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def red_centre(image: Image.Image) -> tuple[float, float]:
    """Centre of the red box's pixels (x, y)."""
    pixels = np.asarray(image.convert("RGB"), np.int16)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    ys, xs = np.nonzero(red)
    assert len(xs) > 20, "no red box found"
    return float(xs.mean()), float(ys.mean())


def expected_red_centre(frame: int, frames: int = 24) -> tuple[float, float]:
    x0, y0, x1, y1 = shape_boxes(frame, frames=frames, size=SIZE)[0]
    return (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2


def decode(data: bytes, **options) -> tuple[list, object]:
    frames: list = []
    summary = decode_video(io.BytesIO(data), DecodeOptions(**options), frames.append)
    return frames, summary


# -- recognising videos ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://x.test/a/clip.mp4", MediaKind.VIDEO),
        ("https://x.test/a/CLIP.MOV?X-Amz-Signature=abc", MediaKind.VIDEO),
        ("https://x.test/a/clip.webm#t=3", MediaKind.VIDEO),
        ("https://x.test/a/clip.mkv", MediaKind.VIDEO),
        ("https://x.test/a/clip.avi", MediaKind.VIDEO),
        ("https://x.test/a/clip%2Em4v", MediaKind.VIDEO),
        ("https://x.test/frames/clip-17/", MediaKind.FRAME_PREFIX),
        ("https://x.test/frames/clip-17/?token=1", MediaKind.FRAME_PREFIX),
        ("https://x.test/a/tree.jpg", MediaKind.IMAGE),
        ("https://x.test/a/clip.mp4.jpg", MediaKind.IMAGE),
        ("https://x.test/image?id=clip.mp4", MediaKind.IMAGE),  # the query is not the path
        ("https://x.test/a/photo", MediaKind.IMAGE),
    ],
)
def test_media_kind_by_url_path(url, kind):
    assert media_kind(url) is kind
    assert kind.is_video == (kind is not MediaKind.IMAGE)


# -- decoding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotate", [0, 90, 180, 270])
def test_frames_are_upright_whatever_the_container_rotation(rotate):
    data = synthetic_video(**CLIP, rotate=rotate)
    with av.open(io.BytesIO(data)) as container:  # the file really is stored turned
        first = next(container.decode(video=0))
        assert first.rotation % 360 == rotate
        assert (first.width, first.height) == (SIZE if rotate in (0, 180) else SIZE[::-1])

    frames, summary = decode(data, fps=2.0)

    assert summary.rotation == rotate
    for frame in frames:
        assert frame.image.size == SIZE and frame.image.mode == "RGB"
        expected = np.asarray(render_frame(frame.source_frame, frames=24, size=SIZE), np.float32)
        assert np.abs(np.asarray(frame.image, np.float32) - expected).mean() < 6  # codec loss only
        assert red_centre(frame.image) == pytest.approx(expected_red_centre(frame.source_frame), abs=1.5)


def test_frames_are_sampled_at_fps_in_time_order():
    data = synthetic_video(**CLIP)

    frames, summary = decode(data, fps=2.0)
    assert [f.source_frame for f in frames] == [0, 4, 8, 12, 16, 20]
    assert [f.timestamp_s for f in frames] == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5])
    assert (summary.kept, summary.decoded, summary.capped) == (6, 24, False)

    every, _ = decode(data, fps=0)
    assert [f.source_frame for f in every] == list(range(24))
    faster_than_the_video, _ = decode(data, fps=30)
    assert len(faster_than_the_video) == 24

    capped, summary = decode(data, fps=0, max_frames=5)
    assert [f.source_frame for f in capped] == [0, 1, 2, 3, 4]
    assert summary.capped and summary.decoded == 5  # decoding stopped there


def test_containers_and_codecs():
    for container, codec in [("webm", "libvpx-vp9"), ("avi", "mpeg4"), ("matroska", "libx264")]:
        frames, _ = decode(synthetic_video(**CLIP, container=container, codec=codec), fps=1.0)
        assert [f.source_frame for f in frames] == [0, 8, 16], container


def audio_only_wav() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="wav") as output:
        stream = output.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            output.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<html>not found</html>" * 20, "not_a_video"),
        (b"", "not_a_video"),
        (audio_only_wav(), "no_video_stream"),
    ],
)
def test_bad_videos_are_rejected_with_a_reason(data, reason):
    with pytest.raises(VideoRejected) as raised:
        decode(data)
    assert raised.value.reason == reason


# -- frame prefixes ----------------------------------------------------------------------------------


def test_frame_listing_sorted_by_name_numbers_as_numbers():
    body = json.dumps(["f10.jpg", "f2.jpg", "https://cdn.test/x/f1.jpg?sig=1", "f2.jpg"]).encode()
    assert parse_listing("http://h.test/clips/a/", body) == [
        "https://cdn.test/x/f1.jpg?sig=1",
        "http://h.test/clips/a/f2.jpg",
        "http://h.test/clips/a/f10.jpg",
    ]
    for bad, reason in [
        (b"<html>", "bad_listing"),
        (b'{"frames": []}', "bad_listing"),
        (b'["a.jpg", 3]', "bad_listing"),
        (b"[]", "no_frames"),
    ]:
        with pytest.raises(VideoRejected) as raised:
            parse_listing("http://h.test/a/", bad)
        assert raised.value.reason == reason, bad


def test_fetch_to_file_starts_over_on_a_retry(dev_server, tmp_path):
    data = synthetic_video(**CLIP)
    server = dev_server(images={"clip.mp4": data})
    server.inject("/images/clip.mp4", [Fault(truncate_to=len(data) // 2)])  # dropped part-way
    policy = DownloadPolicy(max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.01)

    async def fetch() -> int:
        async with ImageFetcher(policy) as fetcher:
            with open(tmp_path / "clip.mp4", "w+b") as file:
                return await fetcher.fetch_to_file(server.image_url("clip.mp4"), file)

    assert asyncio.run(fetch()) == len(data)
    assert (tmp_path / "clip.mp4").read_bytes() == data
    assert len(server.paths("/images/clip.mp4")) == 2


# -- the asset ---------------------------------------------------------------------------------------


def write_sample(store, urls: list[str], shard: str = SHARD) -> None:
    rows = [
        {
            "image_id": image_id_for_url(url),
            "url": url,
            "label": "ball",
            "shard": shard,
            "source_id": None,
            "sample_key": n,
        }
        for n, url in enumerate(urls)
    ]
    write_parquet(store, layout.SAMPLE, pa.Table.from_pylist(rows, schema=SAMPLE))


def materialize_frames(storage_resource, **config):
    from dagster import DagsterInstance, RunConfig, materialize

    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", [SHARD])
    return materialize(
        [video_frames],
        partition_key=SHARD,
        resources={"storage": storage_resource},
        instance=instance,
        run_config=RunConfig(ops={"video_frames": VideoFramesConfig(**{"max_retries": 0, **config})}),
        raise_on_error=False,
    )


def frames_metadata(result) -> dict:
    (materialization,) = result.asset_materializations_for_node("video_frames")
    return {key: value.value for key, value in materialization.metadata.items()}


def frame_rows(store) -> dict[str, list[dict]]:
    table = read_parquet(store, layout.video_frames_index(SHARD))
    assert table.schema.equals(VIDEO_FRAMES)
    rows: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows.setdefault(row["url"].split("/images/", 1)[1], []).append(row)
    return rows


def video_server(dev_server):
    """Videos of every kind the catalog may hold, good and bad, plus one image."""
    small = (48, 32)
    files = {
        "clip.mp4": synthetic_video(**CLIP),
        "turned.mov": synthetic_video(**CLIP, rotate=90, container="mov"),
        "clip.webm": synthetic_video(**CLIP, container="webm", codec="libvpx-vp9"),
        "huge.mkv": synthetic_video(frames=24, fps=8, size=(640, 480), container="matroska"),
        "page.mp4": b"<html>sorry, this video was removed</html>" * 10,
        "seq/": json.dumps([f"{n}.jpg" for n in (10, 9, 8, 2, 1, 0)]).encode(),
        **{f"seq/{n}.jpg": jpeg(render_frame(n, frames=11, size=small)) for n in (0, 1, 2, 8, 9, 10)},
        "tree.jpg": jpeg(Image.new("RGB", (32, 32), (0, 120, 0))),
    }
    return dev_server(images=files), files


def test_video_frames_asset_on_both_backends(dev_server, storage_resource, store):
    server, files = video_server(dev_server)
    names = ["clip.mp4", "turned.mov", "clip.webm", "seq/", "huge.mkv", "page.mp4", "missing.avi", "tree.jpg"]
    write_sample(store, [server.image_url(name) for name in names])
    max_bytes = max(len(files[n]) for n in ("clip.mp4", "turned.mov", "clip.webm"))
    assert len(files["huge.mkv"]) > max_bytes

    result = materialize_frames(storage_resource, max_bytes=max_bytes, max_failure_rate=0.5)

    assert result.success
    rows = frame_rows(store)
    assert list(rows) == names[:-1]  # sample order; the image is not video_frames' business
    assert not server.paths("/images/tree.jpg")
    for name in ["clip.mp4", "turned.mov", "clip.webm"]:
        video = rows[name]
        assert [r["frame_index"] for r in video] == list(range(6))
        assert [r["source_frame"] for r in video] == [0, 4, 8, 12, 16, 20]
        assert {(r["width"], r["height"], r["status"]) for r in video} == {(*SIZE, "ok")}
        video_id = image_id_for_url(server.image_url(name))
        assert {r["video_id"] for r in video} == {video_id}
        for row in video:
            stored = store.get_bytes(layout.video_frame(SHARD, video_id, row["frame_index"]))
            assert hashlib.sha256(stored).hexdigest() == row["sha256"]
            image = Image.open(io.BytesIO(stored))
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", SIZE)
            assert red_centre(image) == pytest.approx(expected_red_centre(row["source_frame"]), abs=1.5)
    # A frame prefix: every listed frame, in name order, no timestamps.
    seq = rows["seq/"]
    assert [r["source_frame"] for r in seq] == list(range(6)) and [r["timestamp_s"] for r in seq] == [
        None
    ] * 6
    seq_id = image_id_for_url(server.image_url("seq/"))
    for row, n in zip(seq, (0, 1, 2, 8, 9, 10), strict=True):
        stored = Image.open(
            io.BytesIO(store.get_bytes(layout.video_frame(SHARD, seq_id, row["frame_index"])))
        )
        expected = np.asarray(render_frame(n, frames=11, size=(48, 32)), np.float32)
        assert np.abs(np.asarray(stored, np.float32) - expected).mean() < 6
    # Quarantined: one row each, with a reason and no frames left behind.
    quarantined = {name: rows[name] for name in ["huge.mkv", "page.mp4", "missing.avi"]}
    assert {name: [(r["frame_index"], r["status"]) for r in v] for name, v in quarantined.items()} == {
        "huge.mkv": [(-1, "too_large")],
        "page.mp4": [(-1, "not_a_video")],
        "missing.avi": [(-1, "http_error")],
    }
    assert "404" in quarantined["missing.avi"][0]["detail"]
    stored_videos = {info.key.split("/")[2] for info in store.list(f"video_frames/{SHARD}/")}
    assert stored_videos == {image_id_for_url(server.image_url(n)) for n in names[:4]}

    metadata = frames_metadata(result)
    assert {k: metadata[k] for k in ["videos", "videos_ok", "videos_quarantined", "frames"]} == {
        "videos": 7,
        "videos_ok": 4,
        "videos_quarantined": 3,
        "frames": 24,
    }
    assert metadata["quarantine_counts"] == {"too_large": 1, "not_a_video": 1, "http_error": 1}
    assert metadata["frames_per_s"] > 0 and metadata["decode_s"] > 0
    assert metadata["preview"].startswith("![") and "base64," in metadata["preview"]


def test_rerun_replaces_a_videos_frames(dev_server, storage_resource, store):
    server = dev_server(images={"clip.mp4": synthetic_video(**CLIP)})
    write_sample(store, [server.image_url("clip.mp4")])
    video_id = image_id_for_url(server.image_url("clip.mp4"))

    assert materialize_frames(storage_resource, fps=0).success
    assert len(list(store.list(f"video_frames/{SHARD}/{video_id}/"))) == 24
    result = materialize_frames(storage_resource, fps=1.0, max_frames=2)

    assert result.success
    keys = sorted(info.key for info in store.list(f"video_frames/{SHARD}/{video_id}/"))
    assert keys == [layout.video_frame(SHARD, video_id, n) for n in (0, 1)]  # no frames of the first run
    assert [r["source_frame"] for r in frame_rows(store)["clip.mp4"]] == [0, 8]
    assert frames_metadata(result)["videos_capped"] == 1

    server.inject("/images/clip.mp4", [Fault(status=404)])  # gone now: quarantined, frames removed
    assert materialize_frames(storage_resource, max_failure_rate=1.0).success
    assert [r["status"] for r in frame_rows(store)["clip.mp4"]] == ["http_error"]
    assert not list(store.list(f"video_frames/{SHARD}/{video_id}/"))


def test_too_many_bad_videos_fail_the_shard_after_writing_the_index(dev_server, storage_resource, store):
    frame = jpeg(render_frame(0, frames=2, size=SIZE))
    gap = {"gap/": b'["0.jpg", "1.jpg", "2.jpg"]', "gap/0.jpg": frame, "gap/2.jpg": frame}  # 1.jpg: 404
    server = dev_server(images={"clip.mp4": synthetic_video(**CLIP), "bad.mp4": b"nope" * 100, **gap})
    write_sample(store, [server.image_url(n) for n in ("clip.mp4", "bad.mp4", "gone.webm", "gap/")])

    result = materialize_frames(storage_resource, max_failure_rate=0.5)

    assert not result.success
    rows = frame_rows(store)
    assert [r["status"] for r in rows["bad.mp4"] + rows["gone.webm"] + rows["gap/"]] == [
        "not_a_video",
        "http_error",
        "bad_frame",
    ]
    assert "frame 1 " in rows["gap/"][0]["detail"] and "404" in rows["gap/"][0]["detail"]
    assert len(rows["clip.mp4"]) == 6
    stored_videos = {info.key.split("/")[2] for info in store.list(f"video_frames/{SHARD}/")}
    assert stored_videos == {image_id_for_url(server.image_url("clip.mp4"))}  # no half video left


def test_a_shard_without_videos_materializes_with_zero_counts(dev_server, storage_resource, store):
    server = dev_server(images={"tree.jpg": b"not fetched"})
    write_sample(store, [server.image_url("tree.jpg")])

    result = materialize_frames(storage_resource)

    assert result.success
    assert read_parquet(store, layout.video_frames_index(SHARD)).num_rows == 0
    metadata = frames_metadata(result)
    assert (metadata["videos"], metadata["frames"], metadata["failure_rate"]) == (0, 0, 0.0)
    assert "preview" not in metadata and not server.paths("/images/")


def test_normalized_images_skips_videos_without_downloading_them(dev_server, storage_resource, store):
    tree = jpeg(Image.new("RGB", (32, 24), (0, 120, 0)))
    server = dev_server(images={"tree.jpg": tree, "clip.mp4": synthetic_video(**CLIP), "seq/": b"[]"})
    write_sample(store, [server.image_url(n) for n in ("tree.jpg", "clip.mp4", "seq/")])

    result = materialize_images(storage_resource, SHARD, max_failure_rate=0.0)

    assert result.success  # skipped videos are not failures
    index = read_parquet(store, layout.image_index(SHARD)).to_pylist()
    assert [(row["url"].rsplit("/", 1)[1], row["status"]) for row in index] == [("tree.jpg", "ok")]
    assert server.paths("/images/") == ["/images/tree.jpg"]
    metadata = images_metadata(result)
    assert (metadata["videos_skipped"], metadata["images_quarantined"]) == (2, 0)


def test_write_frames_helper_matches_the_index_contract(store):
    frames = [render_frame(n, frames=3, size=SIZE) for n in range(3)]
    write_frames(store, SHARD, "a" * 16, frames)
    rows = write_frames(store, SHARD, "b" * 16, frames[:2], fps=4.0)
    write_frames(store, SHARD, "a" * 16, frames[:1])  # replaces a's rows

    table = read_parquet(store, layout.video_frames_index(SHARD))
    assert table.schema.equals(VIDEO_FRAMES)
    assert [(r["video_id"][0], r["frame_index"]) for r in table.to_pylist()] == [("b", 0), ("b", 1), ("a", 0)]
    assert [r["timestamp_s"] for r in rows] == [0.0, 0.25]
    image = Image.open(io.BytesIO(store.get_bytes(layout.video_frame(SHARD, "b" * 16, 1))))
    assert image.size == SIZE
