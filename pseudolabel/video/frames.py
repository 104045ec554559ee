"""A video's frames as stored: JPEG keys, index rows (``schemas.VIDEO_FRAMES``), the frame-prefix
listing format, the shard's counters and a preview.

Each video item becomes either frames ``video_frames/<shard>/<video_id>/000000.jpg, 000001.jpg, ...``
(numbered 0.. in time order, no gaps: SAM2's video predictor loads such a folder) with one ``ok`` row
each in ``video_frames/<shard>.parquet``, or a single quarantined row (``frame_index`` -1, ``status`` =
the reason, ``detail`` = what happened). ``video_id`` is :func:`pseudolabel.ids.image_id_for_url` of the
URL; ``timestamp_s`` is seconds after the video's first frame; ``width``/``height`` are upright.

**Frame prefixes** (URLs ending in ``/``) are listed by a GET of the prefix URL, which must answer a
JSON array of frame names: strings, each a file name relative to the prefix (``"0001.jpg"``) or an
absolute http(s) URL (e.g. signed). Frames are taken in name order (digit runs compared as numbers, so
``frame2`` comes before ``frame10``; duplicates once), the first ``max_frames`` of them, every one:
``fps`` does not apply, the listing already is a frame sequence, and it has no timestamps, so
``timestamp_s`` is null. Anything else than such a list is ``bad_listing``, an empty list ``no_frames``.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
from PIL import Image

from pseudolabel import layout
from pseudolabel.ids import image_id_for_url, sha256_hex
from pseudolabel.images.index import SampleItem
from pseudolabel.preview import thumbnail
from pseudolabel.schemas import VIDEO_FRAMES
from pseudolabel.storage import ObjectStore
from pseudolabel.video.decode import SampledFrame, VideoReason, VideoRejected

OK = "ok"
QUARANTINED_FRAME_INDEX = -1
PENDING_WRITES = 16  # encoded frames waiting for storage, per video (bounds memory)
EXAMPLES_PER_REASON = 3

Row = dict[str, Any]


@dataclass
class VideoStats:
    videos: int = 0
    ok: int = 0
    quarantined: int = 0
    frames: int = 0
    capped: int = 0  # videos cut at max_frames
    decode_s: float = 0.0  # summed over videos: decoding, encoding and storing their frames
    bytes_downloaded: int = 0
    elapsed_s: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few "url: detail"

    @property
    def failure_rate(self) -> float:
        return self.quarantined / self.videos if self.videos else 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.decode_s if self.decode_s > 0 else 0.0

    def record(self, rows: Sequence[Row], seconds: float = 0.0, capped: bool = False) -> None:
        """Count one video: its rows, the time its frames took, whether max_frames cut it."""
        self.videos += 1
        if rows[0]["status"] == OK:
            self.ok += 1
            self.frames += len(rows)
            self.decode_s += seconds
            self.capped += capped
            return
        self.quarantined += 1
        reason = rows[0]["status"]
        self.reasons[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{rows[0]['url']}: {rows[0]['detail']}")

    def reasons_markdown(self) -> str:
        """Counts per reason with a few examples, as a Markdown table."""
        if not self.reasons:
            return "No quarantined videos."
        lines = ["| reason | count | example |", "|---|---:|---|"]
        for reason, count in self.reasons.most_common():
            for n, example in enumerate(self.examples.get(reason, [])):
                shown = (reason, str(count)) if n == 0 else ("", "")
                cell = " ".join(example.split()).replace("|", "\\|")[:200]
                lines.append(f"| {shown[0]} | {shown[1]} | {cell} |")
        return "\n".join(lines)


def frames_table(rows: Iterable[Row]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=VIDEO_FRAMES)


def video_dir(shard: str, video_id: str) -> str:
    """The folder of one video's frames (``video_frames/<shard>/<video_id>/``)."""
    return posixpath.dirname(layout.video_frame(shard, video_id, 0)) + "/"


def preview_frames(
    store: ObjectStore, shard: str, index: pa.Table, videos: int = 3, per_video: int = 4, max_side: int = 192
) -> list[Image.Image]:
    """Up to ``per_video`` frames, spread over the clip, of each of the first ``videos`` stored videos."""
    by_video: dict[str, list[int]] = {}
    for row in index.select(["video_id", "frame_index", "status"]).to_pylist():
        if row["status"] == OK and (row["video_id"] in by_video or len(by_video) < videos):
            by_video.setdefault(row["video_id"], []).append(row["frame_index"])
    images = []
    for video_id, numbers in by_video.items():
        step = max(1, -(-len(numbers) // per_video))  # ceil: at most per_video picks
        for number in numbers[::step][:per_video]:
            images.append(
                thumbnail(store.get_bytes(layout.video_frame(shard, video_id, number)), max_side)[0]
            )
    return images


def quarantined_row(item: SampleItem, reason: str, detail: str) -> Row:
    return {
        "video_id": image_id_for_url(item.url),
        "url": item.url,
        "label": item.label,
        "frame_index": QUARANTINED_FRAME_INDEX,
        "source_frame": None,
        "timestamp_s": None,
        "width": None,
        "height": None,
        "sha256": None,
        "status": str(reason),
        "detail": detail,
    }


def parse_listing(prefix_url: str, body: bytes) -> list[str]:
    """Frame URLs of a frame prefix's listing, in name order (format in the module docstring)."""
    try:
        names = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise VideoRejected(VideoReason.BAD_LISTING, f"not JSON ({len(body)} bytes): {exc}") from exc
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        raise VideoRejected(VideoReason.BAD_LISTING, "expected a JSON array of frame names (strings)")
    if not names:
        raise VideoRejected(VideoReason.NO_FRAMES, "the listing is an empty array")
    urls = {urljoin(prefix_url, name.strip()) for name in names}
    return sorted(urls, key=lambda url: _natural_key(posixpath.basename(urlsplit(url).path)))


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part]


class FrameWriter:
    """Encodes each frame of one video as JPEG, stores it (a few writes in flight) and keeps its row."""

    def __init__(
        self, store: ObjectStore, shard: str, item: SampleItem, quality: int, writes: ThreadPoolExecutor
    ):
        self.store, self.shard, self.item, self.quality, self.writes = store, shard, item, quality, writes
        self.video_id = image_id_for_url(item.url)
        self.rows: list[Row] = []
        self._pending: list[Future[None]] = []

    def add_decoded(self, frame: SampledFrame) -> None:
        buffer = io.BytesIO()
        frame.image.save(buffer, format="JPEG", quality=self.quality)
        self.add(buffer.getvalue(), frame.image.size, frame.source_frame, frame.timestamp_s)

    def add(self, jpeg: bytes, size: tuple[int, int], source_frame: int, timestamp_s: float | None) -> None:
        frame_index = len(self.rows)
        key = layout.video_frame(self.shard, self.video_id, frame_index)
        self._pending.append(self.writes.submit(self.store.put_bytes, key, jpeg))
        if len(self._pending) >= PENDING_WRITES:
            self._pending.pop(0).result()
        self.rows.append(
            {
                "video_id": self.video_id,
                "url": self.item.url,
                "label": self.item.label,
                "frame_index": frame_index,
                "source_frame": source_frame,
                "timestamp_s": timestamp_s,
                "width": size[0],
                "height": size[1],
                "sha256": sha256_hex(jpeg),
                "status": OK,
                "detail": None,
            }
        )

    def finish(self) -> None:
        """Wait for every write; a storage error raises here."""
        pending, self._pending = self._pending, []
        for write in pending:
            write.result()
