"""One shard's videos end to end: download or list, decode, store frames, write the frame index.

**Video files** are downloaded with :class:`~pseudolabel.images.download.ImageFetcher` (the images' SSRF
guard, retries and timeouts, a larger ``max_bytes``) into a temporary file (``$TMPDIR``; at most
``concurrency`` files of up to ``max_bytes`` each at once), then decoded by
:func:`~pseudolabel.video.decode.decode_video` in a thread; each sampled frame is JPEG-encoded and stored
as it is decoded, so memory stays bounded whatever the video's length.

**Frame prefixes** are listed (format in :mod:`pseudolabel.video.frames`) and their frames downloaded a
few at a time, each through the image normaliser (EXIF orientation, RGB; listings and frames capped at
``IMAGE_MAX_BYTES``). A frame that fails quarantines its whole video as ``bad_frame``: a gap would
break tracking.

A bad video becomes a quarantined row with a reason, never an exception; the caller decides whether
the shard's failure rate is acceptable. Every run processes all of the shard's videos again (no reuse
across runs); a video's earlier frames are deleted first, so a folder never mixes runs, and a
quarantined video (also one rejected part-way) leaves no frames. Storage failures propagate
(retrying the step is the answer).
"""

from __future__ import annotations

import asyncio
import posixpath
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

import pyarrow as pa

from pseudolabel import layout
from pseudolabel.ids import image_id_for_url
from pseudolabel.images.download import DownloadPolicy, ImageFetcher
from pseudolabel.images.errors import ImageRejected
from pseudolabel.images.index import SampleItem
from pseudolabel.images.normalize import NormalizeOptions, normalize_image
from pseudolabel.media import MediaKind, media_kind
from pseudolabel.storage import ObjectStore, write_parquet
from pseudolabel.video.decode import DecodeOptions, VideoReason, VideoRejected, decode_video
from pseudolabel.video.frames import (
    OK,
    FrameWriter,
    Row,
    VideoStats,
    frames_table,
    parse_listing,
    quarantined_row,
    video_dir,
)

VIDEO_MAX_BYTES = 500 * 1024 * 1024
IMAGE_MAX_BYTES = 50 * 1024 * 1024  # one listing or one frame of a frame prefix
FRAME_WINDOW = 8  # frames of a frame prefix downloaded at once

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class VideoOptions:
    download: DownloadPolicy = field(
        default_factory=lambda: DownloadPolicy(concurrency=4, timeout_s=300.0, max_bytes=VIDEO_MAX_BYTES)
    )
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    jpeg_quality: int = 95
    store_workers: int = 8  # threads for object-store writes

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100 or self.store_workers < 1:
            raise ValueError(f"invalid video options: {self}")


@dataclass(frozen=True)
class VideoShardResult:
    index: pa.Table  # schemas.VIDEO_FRAMES, videos in sample order, frames in time order
    stats: VideoStats


def process_video_shard(
    store: ObjectStore,
    shard: str,
    items: Sequence[SampleItem],
    options: VideoOptions | None = None,
    progress: ProgressCallback | None = None,
) -> VideoShardResult:
    """Turn every video item of ``shard`` into frames or a quarantined row; write and return the index.

    Image items in ``items`` are ignored. The index is written before this returns, also when many
    videos are quarantined: the caller decides whether that fails the shard.
    """
    options = options or VideoOptions()
    started = time.monotonic()
    videos = [item for item in items if media_kind(item.url).is_video]
    stats = VideoStats()
    results: dict[str, list[Row]] = {}
    if videos:
        results = asyncio.run(_ShardRun(store, shard, options, stats, progress).run(videos))
    index = frames_table(row for item in videos for row in results[item.url])
    write_parquet(store, layout.video_frames_index(shard), index)
    stats.elapsed_s = time.monotonic() - started
    return VideoShardResult(index=index, stats=stats)


def _add_all(writer: FrameWriter, frames: Sequence[tuple[bytes, tuple[int, int]]], first: int) -> None:
    for k, (jpeg, size) in enumerate(frames):
        writer.add(jpeg, size, first + k, None)


_Outcome = tuple[list[Row], float, bool]  # a video's rows, seconds its frames took, cut at max_frames


class _ShardRun:
    def __init__(
        self,
        store: ObjectStore,
        shard: str,
        options: VideoOptions,
        stats: VideoStats,
        progress: ProgressCallback | None,
    ):
        self.store = store
        self.shard = shard
        self.options = options
        self.stats = stats
        self.progress = progress

    async def run(self, videos: Sequence[SampleItem]) -> dict[str, list[Row]]:
        results: dict[str, list[Row]] = {}
        pending = iter(videos)  # shared by the workers: each next() hands a video to exactly one
        policy = self.options.download
        frame_policy = replace(policy, max_bytes=min(policy.max_bytes, IMAGE_MAX_BYTES))
        with (
            ThreadPoolExecutor(policy.concurrency, thread_name_prefix="video-decode") as cpu,
            ThreadPoolExecutor(self.options.store_workers, thread_name_prefix="video-store") as writes,
        ):
            async with ImageFetcher(policy) as fetcher, ImageFetcher(frame_policy) as frame_fetcher:

                async def worker() -> None:
                    for item in pending:
                        if media_kind(item.url) is MediaKind.FRAME_PREFIX:
                            rows, seconds, capped = await self._frame_prefix(item, frame_fetcher, cpu, writes)
                        else:
                            rows, seconds, capped = await self._video_file(item, fetcher, cpu, writes)
                        if rows[0]["status"] != OK:  # no frames of an earlier run stay behind
                            folder = video_dir(self.shard, image_id_for_url(item.url))
                            await asyncio.get_running_loop().run_in_executor(
                                writes, self.store.delete_prefix, folder
                            )
                        results[item.url] = rows
                        self.stats.record(rows, seconds, capped)
                        if self.progress is not None:
                            self.progress(self._progress_line(item, rows, len(videos)))

                try:
                    async with asyncio.TaskGroup() as group:  # a storage error cancels the rest
                        for _ in range(min(len(videos), policy.concurrency)):
                            group.create_task(worker())
                except BaseExceptionGroup as failed:
                    raise failed.exceptions[0] from None
        return results

    async def _video_file(
        self, item: SampleItem, fetcher: ImageFetcher, cpu: ThreadPoolExecutor, writes: ThreadPoolExecutor
    ) -> _Outcome:
        suffix = posixpath.splitext(urlsplit(item.url).path)[1]
        with tempfile.NamedTemporaryFile(prefix="pseudolabel-video-", suffix=suffix) as file:
            try:
                self.stats.bytes_downloaded += await fetcher.fetch_to_file(item.url, file)
            except ImageRejected as rejection:
                return [quarantined_row(item, rejection.reason, rejection.detail)], 0.0, False
            file.flush()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(cpu, self._decode_and_store, item, file.name, writes)

    def _decode_and_store(self, item: SampleItem, path: str, writes: ThreadPoolExecutor) -> _Outcome:
        writer = self._writer(item, writes)
        try:
            summary = decode_video(path, self.options.decode, writer.add_decoded)
            writer.finish()
        except VideoRejected as rejection:
            writer.finish()  # the caller deletes what was stored
            return [quarantined_row(item, rejection.reason, rejection.detail)], 0.0, False
        except BaseException:
            writer.finish()
            raise
        return writer.rows, summary.seconds, summary.capped

    async def _frame_prefix(
        self, item: SampleItem, fetcher: ImageFetcher, cpu: ThreadPoolExecutor, writes: ThreadPoolExecutor
    ) -> _Outcome:
        try:
            listing = await fetcher.fetch(item.url)
        except ImageRejected as rejection:
            return [quarantined_row(item, rejection.reason, f"listing: {rejection.detail}")], 0.0, False
        try:
            listed = parse_listing(item.url, listing)
        except VideoRejected as rejection:
            return [quarantined_row(item, rejection.reason, rejection.detail)], 0.0, False
        urls = listed[: self.options.decode.max_frames]
        started = time.monotonic()
        writer = await asyncio.get_running_loop().run_in_executor(writes, self._writer, item, writes)
        normalize = NormalizeOptions(jpeg_quality=self.options.jpeg_quality)
        loop = asyncio.get_running_loop()

        async def one(n: int, url: str) -> tuple[bytes, tuple[int, int]]:
            try:
                data = await fetcher.fetch(url)
                self.stats.bytes_downloaded += len(data)
                image = await loop.run_in_executor(cpu, normalize_image, data, normalize)
            except ImageRejected as rejection:
                raise VideoRejected(VideoReason.BAD_FRAME, f"frame {n} {url}: {rejection.message}") from None
            return image.jpeg, (image.width, image.height)

        try:
            for first in range(0, len(urls), FRAME_WINDOW):
                try:
                    async with asyncio.TaskGroup() as group:  # the first failure cancels the rest
                        window = urls[first : first + FRAME_WINDOW]
                        tasks = [group.create_task(one(first + k, url)) for k, url in enumerate(window)]
                except BaseExceptionGroup as failed:
                    raise failed.exceptions[0] from None
                # Off the event loop: adding waits when too many writes are in flight.
                await loop.run_in_executor(cpu, _add_all, writer, [task.result() for task in tasks], first)
            await loop.run_in_executor(cpu, writer.finish)
        except VideoRejected as rejection:
            await loop.run_in_executor(cpu, writer.finish)  # the caller deletes what was stored
            return [quarantined_row(item, rejection.reason, rejection.detail)], 0.0, False
        return writer.rows, time.monotonic() - started, len(listed) > len(urls)

    def _writer(self, item: SampleItem, writes: ThreadPoolExecutor) -> FrameWriter:
        """A writer for ``item`` whose folder holds no frames of an earlier run (blocking)."""
        writer = FrameWriter(self.store, self.shard, item, self.options.jpeg_quality, writes)
        self.store.delete_prefix(video_dir(self.shard, writer.video_id))
        return writer

    def _progress_line(self, item: SampleItem, rows: Sequence[Row], planned: int) -> str:
        stats = self.stats
        what = f"{len(rows)} frames" if rows[0]["status"] == OK else f"quarantined ({rows[0]['status']})"
        return (
            f"{self.shard}: video {stats.videos}/{planned} {image_id_for_url(item.url)}: {what}; "
            f"{stats.ok} ok, {stats.quarantined} quarantined, {stats.frames} frames"
        )
