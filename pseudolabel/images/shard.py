"""One shard end to end: reuse what is already stored, download the rest, normalise, store, index.

Downloads are async (one event loop, bounded by the download policy); decoding/encoding runs in
a thread pool and object-store writes in another, so CPU work, network waits and storage
latency all overlap. A bad image becomes a quarantined row; storage failures propagate (they
are not the image's fault, and retrying the shard is the right response).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
from PIL import Image

from pseudolabel import layout
from pseudolabel.images.bomb_guard import decompression_bomb_guard
from pseudolabel.images.download import DownloadPolicy, ImageFetcher
from pseudolabel.images.errors import ImageRejected
from pseudolabel.images.index import (
    OK,
    IndexRow,
    index_table,
    ok_row,
    quarantined_row,
    read_previous_index,
    reusable_rows,
)
from pseudolabel.images.normalize import NormalizeOptions, normalize_image
from pseudolabel.images.sample_items import SampleItem
from pseudolabel.images.stats import ShardStats
from pseudolabel.storage import ObjectStore

ProgressCallback = Callable[[str], None]


@dataclass(frozen=True)
class ShardOptions:
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    normalize: NormalizeOptions = field(default_factory=NormalizeOptions)
    decode_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    store_workers: int = 8  # threads for blocking object-store writes (S3 PUT latency)
    progress_every: int = 100

    def __post_init__(self) -> None:
        if self.decode_workers < 1 or self.store_workers < 1 or self.progress_every < 1:
            raise ValueError(f"invalid shard options: {self}")


@dataclass(frozen=True)
class ShardResult:
    index: pa.Table  # schemas.IMAGE_INDEX, one row per sample item, in sample order
    stats: ShardStats


def process_shard(
    store: ObjectStore,
    shard: str,
    items: Sequence[SampleItem],
    options: ShardOptions | None = None,
    progress: ProgressCallback | None = None,
) -> ShardResult:
    """Make every item of ``shard`` either a stored JPEG or a quarantined row; returns the index.

    The caller writes the index (``layout.image_index(shard)``); images are written here.
    """
    options = options or ShardOptions()
    started = time.monotonic()
    stats = ShardStats(shard)

    previous = read_previous_index(store, shard)
    # One LIST of the shard's prefix checks every previous image (no per-image HEAD requests).
    listing = store.list(layout.images_dir(shard)) if previous is not None else []
    stored_sizes = {info.key: info.size for info in listing}
    rows = reusable_rows(previous, stored_sizes, shard, items)
    for row in rows.values():
        stats.record(row, reused=True)

    missing = [item for item in items if item.image_id not in rows]
    if missing:
        run = _DownloadRun(store, shard, options, stats, progress, planned=len(items))
        # Pillow's guard is process-global: set once here, around all the worker threads.
        with decompression_bomb_guard(options.normalize.max_pixels):
            rows.update(asyncio.run(run.run(missing)))

    stats.elapsed_s = time.monotonic() - started
    if progress is not None:
        progress(
            stats.progress_line(len(items))
            + f" in {stats.elapsed_s:.1f}s ({stats.images_per_s:.1f} images/s)"
        )
    return ShardResult(index=index_table(rows[item.image_id] for item in items), stats=stats)


class _DownloadRun:
    def __init__(
        self,
        store: ObjectStore,
        shard: str,
        options: ShardOptions,
        stats: ShardStats,
        progress: ProgressCallback | None,
        planned: int,
    ):
        self.store = store
        self.shard = shard
        self.options = options
        self.stats = stats
        self.progress = progress
        self.planned = planned

    async def run(self, items: Sequence[SampleItem]) -> dict[str, IndexRow]:
        rows: dict[str, IndexRow] = {}
        pending = iter(items)  # shared by all workers: each next() hands an item to exactly one
        policy = self.options.download
        # A few workers beyond the download limit keep downloads flowing while others wait on CPU;
        # the worker count also bounds how many bodies are held in memory at once.
        workers = min(len(items), policy.concurrency + 2 * self.options.decode_workers)
        with (
            ThreadPoolExecutor(self.options.decode_workers, thread_name_prefix="normalize") as cpu,
            ThreadPoolExecutor(self.options.store_workers, thread_name_prefix="store") as writes,
        ):
            async with ImageFetcher(policy) as fetcher:

                async def worker() -> None:
                    for item in pending:
                        row = await self._one(item, fetcher, cpu, writes)
                        rows[item.image_id] = row
                        self.stats.record(row, reused=False)
                        self._report()

                async with asyncio.TaskGroup() as group:  # a storage error cancels the rest
                    for _ in range(workers):
                        group.create_task(worker())
        return rows

    async def _one(
        self, item: SampleItem, fetcher: ImageFetcher, cpu: ThreadPoolExecutor, writes: ThreadPoolExecutor
    ) -> IndexRow:
        loop = asyncio.get_running_loop()
        try:
            data = await fetcher.fetch(item.url)
            self.stats.bytes_downloaded += len(data)
            image = await loop.run_in_executor(cpu, normalize_image, data, self.options.normalize)
        except ImageRejected as rejection:
            return quarantined_row(item, rejection)
        del data  # let the raw body go before waiting on storage
        key = layout.image(self.shard, item.image_id)
        await loop.run_in_executor(writes, self.store.put_bytes, key, image.jpeg)
        self.stats.bytes_stored += len(image.jpeg)
        return ok_row(item, image)

    def _report(self) -> None:
        if self.progress is not None and self.stats.fetched % self.options.progress_every == 0:
            self.progress(self.stats.progress_line(self.planned))


def preview_images(
    store: ObjectStore, shard: str, index: pa.Table, limit: int = 8, max_side: int = 256
) -> list[Image.Image]:
    """The first ``limit`` stored images of the shard, decoded small (for a metadata contact sheet)."""
    images = []
    for row in index.to_pylist():
        if len(images) >= limit:
            break
        if row["status"] == OK:
            image = Image.open(io.BytesIO(store.get_bytes(layout.image(shard, row["image_id"]))))
            image.draft("RGB", (max_side, max_side))  # JPEG DCT scaling: a 100 MP image decodes cheaply
            image.load()
            images.append(image)
    return images
