"""Synthetic videos for tests and benchmarks: moving shapes on a plain background, encoded with PyAV.

    data = synthetic_video(None, frames=24, fps=8, size=(96, 64))          # mp4 bytes
    synthetic_video(tmp_path / "clip.mp4", rotate=90)                      # also written to a file
    expected = render_frame(5, frames=24, size=(96, 64))                  # the upright picture of frame 5
    boxes = shape_boxes(5, frames=24, size=(96, 64))                      # where each shape is (or None)
    write_frames(store, "shard-00000", video_id, [expected, ...])         # stored as video_frames does

``size`` is always the *upright* (displayed) size. ``rotate`` stores the frames turned clockwise by that
many degrees with a display matrix saying "turn them back" (what a phone held upright records), so a
reader that honours the container's rotation gets exactly :func:`render_frame` back (up to codec loss).

The default scene (:data:`DEFAULT_SHAPES`): a red box crossing the top half left to right for the whole
clip, and a blue disc that appears half-way through and crosses the bottom half right to left; they never
overlap. Shapes are large, saturated and on a dark grey
background, so thresholding a decoded frame finds them despite compression.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pseudolabel import layout
from pseudolabel.ids import sha256_hex
from pseudolabel.schemas import VIDEO_FRAMES
from pseudolabel.storage import ObjectNotFound, ObjectStore, read_parquet, write_parquet

BACKGROUND = (40, 40, 40)
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), upright pixels


@dataclass(frozen=True)
class MovingShape:
    """A filled shape moving in a straight line from ``start`` to ``end`` (centres, as fractions of
    the upright width/height) between the frame it enters and the last frame."""

    kind: str = "box"  # "box" or "disc"
    color: tuple[int, int, int] = (230, 30, 30)
    size: float = 0.25  # side / diameter as a fraction of the shorter upright side
    start: tuple[float, float] = (0.2, 0.5)
    end: tuple[float, float] = (0.8, 0.5)
    enters_at: float = 0.0  # fraction of the clip: absent from frames before round(enters_at * frames)

    def box(self, frame: int, frames: int, size: tuple[int, int]) -> Box | None:
        """Where the shape is in ``frame`` of ``frames`` (None before it enters)."""
        first = round(self.enters_at * frames)
        if frame < first:
            return None
        progress = (frame - first) / max(1, frames - 1 - first)
        width, height = size
        cx = (self.start[0] + (self.end[0] - self.start[0]) * progress) * width
        cy = (self.start[1] + (self.end[1] - self.start[1]) * progress) * height
        half = self.size * min(width, height) / 2
        return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


DEFAULT_SHAPES: tuple[MovingShape, ...] = (
    MovingShape("box", (230, 30, 30), 0.3, start=(0.2, 0.3), end=(0.8, 0.3)),
    MovingShape("disc", (30, 80, 230), 0.3, start=(0.8, 0.75), end=(0.3, 0.75), enters_at=0.5),
)


def shape_boxes(
    frame: int, *, frames: int, size: tuple[int, int], shapes: Sequence[MovingShape] = DEFAULT_SHAPES
) -> list[Box | None]:
    """Each shape's box in ``frame`` (upright pixels), None where it has not entered yet."""
    return [shape.box(frame, frames, size) for shape in shapes]


def render_frame(
    frame: int,
    *,
    frames: int,
    size: tuple[int, int],
    shapes: Sequence[MovingShape] = DEFAULT_SHAPES,
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """The upright RGB picture of ``frame``."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        box = shape.box(frame, frames, size)
        if box is None:
            continue
        corners = [box[0], box[1], box[2] - 1, box[3] - 1]
        if shape.kind == "disc":
            draw.ellipse(corners, fill=shape.color)
        else:
            draw.rectangle(corners, fill=shape.color)
    return image


def synthetic_video(
    path: str | Path | None = None,
    *,
    frames: int = 24,
    fps: int = 8,
    size: tuple[int, int] = (96, 64),
    rotate: int = 0,
    shapes: Sequence[MovingShape] = DEFAULT_SHAPES,
    container: str = "mp4",
    codec: str = "libx264",
) -> bytes:
    """An encoded clip of ``frames`` frames at ``fps``; written to ``path`` too when given.

    ``rotate`` (0, 90, 180 or 270): frames are stored turned clockwise by that much, and the stream's
    display matrix turns them back counter-clockwise (PyAV's ``VideoFrame.rotation`` reads ``rotate``).
    ``container``/``codec``: e.g. ``"webm"``/``"libvpx-vp9"``, ``"avi"``/``"mpeg4"``. Sizes must be even.
    """
    if rotate % 90 or not 0 <= rotate < 360:
        raise ValueError(f"rotate must be 0, 90, 180 or 270, got {rotate}")
    if size[0] % 2 or size[1] % 2:
        raise ValueError(f"yuv420p needs even sizes, got {size}")
    stored = size if rotate in (0, 180) else (size[1], size[0])
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height = stored
        stream.pix_fmt = "yuv420p"
        if rotate:
            stream.set_display_rotation(rotate)
        for n in range(frames):
            # PIL's rotate is counter-clockwise: -rotate stores the picture turned clockwise.
            picture = render_frame(n, frames=frames, size=size, shapes=shapes).rotate(-rotate, expand=True)
            for packet in stream.encode(av.VideoFrame.from_image(picture)):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def write_frames(
    store: ObjectStore,
    shard: str,
    video_id: str,
    frames: Sequence[Image.Image | np.ndarray],
    *,
    url: str | None = None,
    label: str = "object",
    fps: float = 2.0,
    quality: int = 95,
) -> list[dict]:
    """Store ``frames`` as ``video_frames`` would (JPEGs ``0..n-1`` and rows in the shard's index).

    The video's earlier frames and rows in ``video_frames/<shard>.parquet`` are replaced, other videos'
    kept.
    Returns this video's rows (``schemas.VIDEO_FRAMES``).
    """
    folder = layout.video_frame(shard, video_id, 0).rsplit("/", 1)[0] + "/"
    store.delete_prefix(folder)  # no frames of an earlier call left in the folder
    rows = []
    for index, frame in enumerate(frames):
        image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, np.uint8))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        jpeg = buffer.getvalue()
        store.put_bytes(layout.video_frame(shard, video_id, index), jpeg)
        rows.append(
            {
                "video_id": video_id,
                "url": url or f"https://example.test/videos/{video_id}.mp4",
                "label": label,
                "frame_index": index,
                "source_frame": index,
                "timestamp_s": index / fps,
                "width": image.width,
                "height": image.height,
                "sha256": sha256_hex(jpeg),
                "status": "ok",
                "detail": None,
            }
        )
    key = layout.video_frames_index(shard)
    try:
        kept = [row for row in read_parquet(store, key).to_pylist() if row["video_id"] != video_id]
    except ObjectNotFound:
        kept = []
    write_parquet(store, key, pa.Table.from_pylist(kept + rows, schema=VIDEO_FRAMES))
    return rows
