"""A shard's items, its image index (``schemas.IMAGE_INDEX``) and parts, and the run's counters.

The items are the sample rows the shard must turn into images (:func:`shard_items`; video items are
set aside by :func:`split_videos`); each becomes an index row, ``ok`` or quarantined; :class:`ShardStats`
counts them for progress lines and metadata.

A run records each finished row (``ok`` or quarantined) in small index parts,
``images/<shard>.parts/<n>.parquet``, as it goes: every ``every`` rows, or once the oldest unrecorded
row is ``interval_s`` old (:class:`IndexJournal`). When the run finishes it writes the whole index,
``images/<shard>.parquet``, and then deletes the parts. So parts only exist while a run is in
progress or after one was killed, and a rerun takes over (:func:`read_progress`, :func:`reusable_rows`):

- an ``ok`` row (of the index or of a part) is reused when its JPEG is still stored with the
  recorded size;
- a quarantined row of a part is reused as it is: the killed run had finished that image. A
  quarantined row of the complete index is tried again: re-materializing is how a fixed cause is retried.

Where an image has several rows, the newest wins: a part over the index, a higher part number over
a lower one, a later row of a part over an earlier one. A part that cannot be read (empty, cut short,
not an index) is skipped with a warning. A crash between writing the index and deleting the parts
leaves parts whose rows the index already holds; the only effect is that the next run keeps their
quarantined rows instead of retrying them.

The parts lag the stored JPEGs (a killed run stored images it had not recorded yet, and during a
storage outage no part can be written), so rows are not the only evidence: every JPEG stored under the
shard's prefix that no usable row covers is reused as well, its row rebuilt from the object
(:func:`unrecorded_items`, :func:`stored_row`). Objects are written atomically under the image's content
key, and each carries what its row needs (:func:`pseudolabel.images.normalize.read_stored`), so a
re-run fetches only images that were never stored.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pseudolabel import layout
from pseudolabel.ids import image_id_for_url
from pseudolabel.images.errors import ImageRejected
from pseudolabel.images.normalize import NormalizedImage, StoredImage
from pseudolabel.media import media_kind
from pseudolabel.schemas import IMAGE_INDEX
from pseudolabel.storage import ObjectNotFound, ObjectStore, write_parquet

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["image_id", "url", "label", "shard"]  # all this stage reads from the sample


@dataclass(frozen=True)
class SampleItem:
    image_id: str
    url: str
    label: str


def shard_items(sample: pa.Table, shard: str) -> list[SampleItem]:
    """The shard's items in sample order, each ``image_id`` once (a repeat would race on one key)."""
    rows = sample.filter(pc.equal(sample["shard"], shard)).select(["image_id", "url", "label"]).to_pylist()
    seen: set[str] = set()
    items = []
    for row in rows:
        if row["image_id"] not in seen:
            seen.add(row["image_id"])
            items.append(SampleItem(image_id=row["image_id"], url=row["url"], label=row["label"]))
    return items


def split_videos(items: Iterable[SampleItem]) -> tuple[list[SampleItem], list[SampleItem]]:
    """``(images, videos)`` of ``items`` in their order, by URL (:func:`pseudolabel.media.media_kind`):
    video files and frame prefixes are ``video_frames``' work, never downloaded as images."""
    images: list[SampleItem] = []
    videos: list[SampleItem] = []
    for item in items:
        (videos if media_kind(item.url).is_video else images).append(item)
    return images, videos


# -- index rows ------------------------------------------------------------------------------------

OK = "ok"
QUARANTINED = "quarantined"

IndexRow = dict[str, Any]


def ok_row(item: SampleItem, image: NormalizedImage) -> IndexRow:
    return {
        "image_id": item.image_id,
        "url": item.url,
        "label": item.label,
        "width": image.width,
        "height": image.height,
        "original_orientation": image.original_orientation,
        "bytes": len(image.jpeg),
        "sha256": image.sha256,
        "status": OK,
        "error": None,
    }


def stored_row(item: SampleItem, stored: StoredImage) -> IndexRow:
    """The ``ok`` row of ``item`` rebuilt from its stored JPEG: the row the run that stored it made."""
    return {
        "image_id": item.image_id,
        "url": item.url,
        "label": item.label,
        "width": stored.width,
        "height": stored.height,
        "original_orientation": stored.original_orientation,
        "bytes": stored.bytes,
        "sha256": stored.sha256,
        "status": OK,
        "error": None,
    }


def quarantined_row(item: SampleItem, rejection: ImageRejected) -> IndexRow:
    return {
        "image_id": item.image_id,
        "url": item.url,
        "label": item.label,
        "width": None,
        "height": None,
        "original_orientation": None,
        "bytes": None,
        "sha256": None,
        "status": QUARANTINED,
        "error": rejection.message,
    }


def index_table(rows: Iterable[IndexRow]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=IMAGE_INDEX)


# -- what earlier runs left ------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredProgress:
    """What earlier runs of a shard left behind."""

    index: list[IndexRow]  # rows of the last complete index ([] if none, or unreadable)
    parts: list[list[IndexRow]]  # rows of each readable part, oldest part first
    next_part: int  # the number this run's first part gets (after every existing one)
    unreadable: list[str]  # keys of parts (or the index) that could not be read, ignored

    @property
    def empty(self) -> bool:
        return not self.index and not any(self.parts)


def read_progress(store: ObjectStore, shard: str, workers: int = 8) -> StoredProgress:
    """The shard's complete index and the parts of unfinished runs (parts read ``workers`` at a time).

    A storage error propagates (retrying the step is the answer); an object that is there but is not
    a readable index is ignored and named in ``unreadable``.
    """
    index_key = layout.image_index(shard)
    try:
        index = _read_rows(store, index_key)
    except ObjectNotFound:
        index = []
    numbered = sorted(
        (number, info.key)
        for info in store.list(layout.image_index_parts_dir(shard))
        if (number := layout.image_index_part_number(info.key)) is not None
    )
    keys = [key for _number, key in numbered]
    with ThreadPoolExecutor(max(1, min(workers, len(keys))), thread_name_prefix="index-parts") as pool:
        parts = list(pool.map(lambda key: _read_rows(store, key, missing_ok=True), keys))
    unreadable = ([index_key] if index is None else []) + [
        key for key, rows in zip(keys, parts, strict=True) if rows is None
    ]
    return StoredProgress(
        index=index or [],
        parts=[rows for rows in parts if rows],
        next_part=numbered[-1][0] + 1 if numbered else 0,
        unreadable=unreadable,
    )


def _read_rows(store: ObjectStore, key: str, missing_ok: bool = False) -> list[IndexRow] | None:
    """The rows of an index (or part) object; None if it is not a readable index.

    A missing object raises :class:`ObjectNotFound` (or gives [] with ``missing_ok``); a storage
    outage raises whatever the store raises: neither is the file's fault.
    """
    try:
        data = store.get_bytes(key)
    except ObjectNotFound:
        if missing_ok:  # deleted since it was listed
            return []
        raise
    try:
        table = pq.read_table(io.BytesIO(data))
        return table.select(IMAGE_INDEX.names).cast(IMAGE_INDEX).to_pylist()
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError... for a bad file
        logger.warning("ignoring unreadable image index %s (%d bytes): %s", key, len(data), exc)
        return None


@dataclass(frozen=True)
class Reuse:
    rows: dict[str, IndexRow]  # image_id -> row that needs no download
    from_parts: int  # how many of them an unfinished (killed) run had recorded


def reusable_rows(
    progress: StoredProgress, stored_sizes: Mapping[str, int], shard: str, items: Iterable[SampleItem]
) -> Reuse:
    """Rows of ``items`` that need no download (the rules are in the module docstring).

    ``stored_sizes`` maps keys to sizes from one listing of the shard's image prefix, so
    checking a shard costs one LIST, not one request per image.
    """
    newest: dict[str, tuple[IndexRow, bool]] = {row["image_id"]: (row, False) for row in progress.index}
    for part in progress.parts:
        newest.update((row["image_id"], (row, True)) for row in part)
    reusable: dict[str, IndexRow] = {}
    from_parts = 0
    for item in items:
        found = newest.get(item.image_id)
        if found is None:
            continue
        row, in_part = found
        if row["url"] != item.url:
            continue
        if row["status"] == OK:
            if stored_sizes.get(layout.image(shard, item.image_id)) != row["bytes"]:
                continue
        elif row["status"] != QUARANTINED or not in_part:
            continue
        reusable[item.image_id] = {**row, "label": item.label}  # the sample's label is authoritative
        from_parts += in_part
    return Reuse(rows=reusable, from_parts=from_parts)


def unrecorded_items(
    items: Iterable[SampleItem], reused: Mapping[str, IndexRow], stored_sizes: Mapping[str, int], shard: str
) -> list[SampleItem]:
    """Items with a stored JPEG that no reusable row covers: their rows are rebuilt from the objects.

    Only items whose ``image_id`` is their URL's content id (:func:`pseudolabel.ids.image_id_for_url`, as
    every sample makes it): then the object under that key was made from this URL.
    """
    return [
        item
        for item in items
        if item.image_id not in reused
        and layout.image(shard, item.image_id) in stored_sizes
        and item.image_id == image_id_for_url(item.url)
    ]


# -- recording this run's progress -----------------------------------------------------------------


class IndexJournal:
    """This run's finished rows, written as index parts so that a killed run's work survives.

    ``add`` buffers a row; ``due`` says the buffer should be written; ``take`` hands out the next part
    (key and rows) and ``write`` stores it (blocking; any thread); ``flush`` does both. ``commit``
    writes the complete index and then deletes every part of the shard.
    """

    def __init__(
        self, store: ObjectStore, shard: str, first_part: int, every: int = 25, interval_s: float = 0.5
    ):
        if every < 1 or interval_s <= 0:
            raise ValueError(f"index parts need every >= 1 and interval_s > 0, got {every}, {interval_s}")
        self.store = store
        self.shard = shard
        self.every = every
        self.interval_s = interval_s
        self.recorded = 0  # rows this run has written to parts
        self._next_part = first_part
        self._buffer: list[IndexRow] = []
        self._oldest = 0.0  # monotonic time the oldest buffered row was added
        self._lock = threading.Lock()

    def add(self, row: IndexRow) -> None:
        if not self._buffer:
            self._oldest = time.monotonic()
        self._buffer.append(row)

    def seconds_until_due(self) -> float:
        if not self._buffer:
            return self.interval_s
        if len(self._buffer) >= self.every:
            return 0.0
        return max(0.0, self._oldest + self.interval_s - time.monotonic())

    def due(self) -> bool:
        return bool(self._buffer) and self.seconds_until_due() == 0.0

    def take(self) -> tuple[str, list[IndexRow]] | None:
        if not self._buffer:
            return None
        key = layout.image_index_part(self.shard, self._next_part)
        self._next_part += 1
        rows, self._buffer = self._buffer, []
        return key, rows

    def write(self, part: tuple[str, list[IndexRow]]) -> None:
        key, rows = part
        write_parquet(self.store, key, index_table(rows))
        with self._lock:
            self.recorded += len(rows)

    def flush(self) -> None:
        if (part := self.take()) is not None:
            self.write(part)

    def commit(self, index: pa.Table) -> None:
        """Write ``images/<shard>.parquet`` (atomically), then drop the parts it supersedes."""
        write_parquet(self.store, layout.image_index(self.shard), index)
        self.store.delete_prefix(layout.image_index_parts_dir(self.shard))


# -- counters for this run -------------------------------------------------------------------------

EXAMPLES_PER_REASON = 3


@dataclass
class ShardStats:
    shard: str
    total: int = 0  # items in the shard's sample
    reused: int = 0  # kept from a previous run, not downloaded
    fetched: int = 0  # attempted in this run (downloaded, or failed trying)
    ok: int = 0  # usable images in the index (reused + new)
    quarantined: int = 0
    bytes_downloaded: int = 0
    bytes_stored: int = 0  # JPEG bytes written in this run
    elapsed_s: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    # reason -> a few (image_id, url, error) examples
    examples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    orientations: Counter[int] = field(default_factory=Counter)  # over every "ok" row of the shard

    def record(self, row: IndexRow, *, reused: bool) -> None:
        self.total += 1
        if reused:
            self.reused += 1
        else:
            self.fetched += 1
        if row["status"] == OK:
            self.ok += 1
            self.orientations[int(row["original_orientation"])] += 1
            return
        self.quarantined += 1
        reason = str(row["error"]).split(":", 1)[0]
        self.reasons[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append((row["image_id"], row["url"], row["error"]))

    @property
    def done(self) -> int:
        return self.ok + self.quarantined

    @property
    def failure_rate(self) -> float:
        return self.quarantined / self.total if self.total else 0.0

    @property
    def images_per_s(self) -> float:
        """Throughput of this run's downloads (reused images cost nothing, so they don't count)."""
        return self.fetched / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def progress_line(self, planned: int) -> str:
        return (
            f"{self.shard}: {self.done}/{planned} images ({self.ok} ok, {self.quarantined} quarantined, "
            f"{self.reused} reused), {self.bytes_downloaded / 1e6:.1f} MB downloaded"
        )

    def reasons_markdown(self) -> str:
        """Counts per reason category with a few examples, as a Markdown table."""
        if not self.reasons:
            return "No quarantined images."
        lines = ["| reason | count | example image_id | example error |", "|---|---:|---|---|"]
        for reason, count in self.reasons.most_common():
            for n, (image_id, _url, error) in enumerate(self.examples.get(reason, [])):
                shown = (reason, str(count)) if n == 0 else ("", "")
                lines.append(f"| {shown[0]} | {shown[1]} | `{image_id}` | {_cell(error)} |")
        return "\n".join(lines)


def _cell(text: str, limit: int = 160) -> str:
    """Keep a table cell on one line and short, with pipes escaped."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
