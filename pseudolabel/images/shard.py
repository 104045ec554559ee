"""One shard end to end: reuse what is already stored, download the rest, normalise, store, index.

Downloads are async (one event loop, bounded by the download policy); decoding/encoding runs in
a thread pool and object-store writes in another, so CPU work, network waits and storage
latency all overlap. A bad image becomes a quarantined row; storage failures propagate as
:class:`ShardStorageError` (they are not the image's fault, and retrying the shard is the right
response). Finished rows are recorded in index parts as the run goes (:mod:`pseudolabel.images.index`),
and a rerun after a crash or a failure also reuses every JPEG stored since the last part (its row
rebuilt from the object), so it fetches only images that were never stored.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pseudolabel import layout
from pseudolabel.images.download import DownloadPolicy, ImageFetcher
from pseudolabel.images.errors import ImageRejected
from pseudolabel.images.index import (
    IndexJournal,
    IndexRow,
    SampleItem,
    ShardStats,
    index_table,
    ok_row,
    quarantined_row,
    read_progress,
    reusable_rows,
    stored_row,
    unrecorded_items,
)
from pseudolabel.images.normalize import (
    DEFAULT_MAX_SIDE,
    NormalizeOptions,
    decompression_bomb_guard,
    normalize_image,
    read_stored,
)
from pseudolabel.storage import ObjectNotFound, ObjectStore

ProgressCallback = Callable[[str], None]


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota
    (a container limited to 2 CPUs on a 64-core host reports 64 from ``os.cpu_count()``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


@dataclass(frozen=True)
class ShardOptions:
    download: DownloadPolicy = field(default_factory=DownloadPolicy)
    # Stored at the working resolution by default, as the normalized_images asset does.
    normalize: NormalizeOptions = field(default_factory=lambda: NormalizeOptions(max_side=DEFAULT_MAX_SIDE))
    decode_workers: int = field(default_factory=usable_cpus)
    store_workers: int = 8  # threads for blocking object-store writes (S3 PUT latency)
    progress_every: int = 100
    # Finished rows go to an index part every `record_every` rows, or once the oldest unrecorded one
    # is `record_interval_s` old: a crash loses at most that much finished work.
    record_every: int = 25
    record_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.decode_workers < 1 or self.store_workers < 1 or self.progress_every < 1:
            raise ValueError(f"invalid shard options: {self}")
        if self.record_every < 1 or self.record_interval_s <= 0:
            raise ValueError(f"invalid shard options: {self}")


@dataclass(frozen=True)
class ShardResult:
    index: pa.Table  # schemas.IMAGE_INDEX, one row per sample item, in sample order
    stats: ShardStats
    recovered: int = 0  # reused rows that an unfinished (killed or failed) run had recorded
    rebuilt: int = 0  # reused images no usable row recorded: rows rebuilt from the stored JPEGs


class ShardStorageError(RuntimeError):
    """Storing the shard's images or progress failed; what was stored is reused by a rerun."""


def process_shard(
    store: ObjectStore,
    shard: str,
    items: Sequence[SampleItem],
    options: ShardOptions | None = None,
    progress: ProgressCallback | None = None,
) -> ShardResult:
    """Make every item of ``shard`` either a stored JPEG or a quarantined row; write and return the index.

    The index (``layout.image_index(shard)``) is written before this returns, also when many images
    are quarantined: the caller decides whether that fails the shard.
    """
    options = options or ShardOptions()
    started = time.monotonic()
    stats = ShardStats(shard)

    stored = read_progress(store, shard, workers=options.store_workers)
    if stored.unreadable and progress is not None:
        progress(
            f"{shard}: ignoring unreadable index files (their images are fetched again): {stored.unreadable}"
        )
    # One LIST of the shard's prefix finds every stored image (no per-image HEAD requests).
    sizes = {info.key: info.size for info in store.list(layout.images_dir(shard))}
    reuse = reusable_rows(stored, sizes, shard, items)
    rows = dict(reuse.rows)
    unrecorded = unrecorded_items(items, rows, sizes, shard)
    rebuilt = rebuild_rows(store, shard, unrecorded, workers=options.store_workers)
    rows.update(rebuilt)
    if unrecorded and progress is not None:
        progress(
            f"{shard}: {len(rebuilt)} stored images without a usable index row reused (rows rebuilt from "
            f"the JPEGs); {len(unrecorded) - len(rebuilt)} stored objects not describable are fetched again"
        )
    for row in rows.values():
        stats.record(row, reused=True)

    journal = IndexJournal(store, shard, stored.next_part, options.record_every, options.record_interval_s)
    missing = [item for item in items if item.image_id not in rows]
    if missing:
        run = _DownloadRun(store, shard, options, stats, progress, journal, planned=len(items))
        try:
            # Pillow's guard is process-global: set once here, around all the worker threads.
            with decompression_bomb_guard(options.normalize.max_pixels):
                rows.update(asyncio.run(run.run(missing)))
        except ShardStorageError as exc:
            _record_what_finished(journal, progress)
            parts = store.uri(layout.image_index_parts_dir(shard)).rstrip("/") + "/"
            images = store.uri(layout.images_dir(shard)).rstrip("/") + "/"
            raise ShardStorageError(
                f"{exc}; a rerun reuses every image stored under {images} "
                f"({journal.recorded} of the {stats.fetched} images this run finished are also recorded "
                f"in {parts})"
            ) from exc.__cause__
        except BaseException:
            _record_what_finished(journal, progress)
            raise

    index = index_table(rows[item.image_id] for item in items)
    journal.commit(index)
    stats.elapsed_s = time.monotonic() - started
    if progress is not None:
        progress(
            stats.progress_line(len(items))
            + f" in {stats.elapsed_s:.1f}s ({stats.images_per_s:.1f} images/s)"
        )
    return ShardResult(index=index, stats=stats, recovered=reuse.from_parts, rebuilt=len(rebuilt))


def rebuild_rows(
    store: ObjectStore, shard: str, items: Sequence[SampleItem], workers: int = 8
) -> dict[str, IndexRow]:
    """``image_id -> row`` rebuilt from the stored JPEGs of ``items`` (read ``workers`` at a time); items
    whose object is gone or is not a JPEG this stage made (:func:`read_stored`) are left out, to be
    fetched again. A storage error propagates: the shard cannot start without knowing what it has."""
    if not items:
        return {}

    def rebuild(item: SampleItem) -> IndexRow | None:
        try:
            data = store.get_bytes(layout.image(shard, item.image_id))
        except ObjectNotFound:  # deleted since it was listed
            return None
        found = read_stored(data)
        return None if found is None else stored_row(item, found)

    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="stored-images") as pool:
        rows = list(pool.map(rebuild, items))
    return {item.image_id: row for item, row in zip(items, rows, strict=True) if row is not None}


def _record_what_finished(journal: IndexJournal, progress: ProgressCallback | None) -> None:
    """Best effort on the way out of a failed run: storage may be what failed."""
    try:
        journal.flush()
    except Exception as exc:
        if progress is not None:
            progress(
                f"{journal.shard}: could not record the last finished images: {type(exc).__name__}: {exc}"
            )


class _DownloadRun:
    def __init__(
        self,
        store: ObjectStore,
        shard: str,
        options: ShardOptions,
        stats: ShardStats,
        progress: ProgressCallback | None,
        journal: IndexJournal,
        planned: int,
    ):
        self.store = store
        self.shard = shard
        self.options = options
        self.stats = stats
        self.progress = progress
        self.journal = journal
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
                        self.journal.add(row)
                        if self.journal.due():
                            await self._record(writes)

                try:
                    async with asyncio.TaskGroup() as group:  # a storage error cancels the rest
                        tasks = [group.create_task(worker()) for _ in range(workers)]
                        group.create_task(self._record_on_time(tasks, writes))
                except BaseExceptionGroup as failed:
                    raise failed.exceptions[0] from None  # the first failure; the rest were cancelled
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
        await self._store(writes, key, self.store.put_bytes, key, image.jpeg)
        self.stats.bytes_stored += len(image.jpeg)
        return ok_row(item, image)

    async def _record(self, writes: ThreadPoolExecutor) -> None:
        """Write the buffered rows as the next index part."""
        if (part := self.journal.take()) is not None:
            await self._store(writes, part[0], self.journal.write, part)

    async def _record_on_time(self, workers: list[asyncio.Task[None]], writes: ThreadPoolExecutor) -> None:
        """Record rows that wait longer than the interval (downloads stalled), until the workers are done."""
        while True:
            _done, running = await asyncio.wait(workers, timeout=self.journal.seconds_until_due())
            if not running:
                return
            if self.journal.due():
                await self._record(writes)

    async def _store(
        self, writes: ThreadPoolExecutor, key: str, call: Callable[..., None], *args: object
    ) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(writes, call, *args)
        except Exception as exc:
            raise ShardStorageError(
                f"{self.shard}: storing {self.store.uri(key)} failed ({type(exc).__name__}: {exc})"
            ) from exc

    def _report(self) -> None:
        if self.progress is not None and self.stats.fetched % self.options.progress_every == 0:
            self.progress(self.stats.progress_line(self.planned))
