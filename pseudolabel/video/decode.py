"""One video file -> upright RGB frames at a chosen rate, streamed (PyAV).

:func:`decode_video` opens a file, decodes its first video stream frame by frame and hands each
*sampled* frame to a callback as an upright RGB Pillow image, so memory stays at about one frame
whatever the video's length. Sampling keeps the first frame of every ``1 / fps`` second slot (counted
from the first frame's timestamp) until ``max_frames`` are kept; a video slower than ``fps`` keeps
every frame; ``fps = 0`` keeps every frame.

Upright: the stream's display matrix (PyAV ``VideoFrame.rotation``, degrees counter-clockwise; phones
record portrait clips as landscape frames plus a rotation) is applied to the pixels, rounded to the
nearest quarter turn. A mirroring display matrix (rare; not produced by cameras) is not undone.

A file that is not a video, has no video stream, breaks while decoding or yields no frame raises
:class:`VideoRejected` with a stable reason category; the caller quarantines it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
from PIL import Image

DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 300

_QUARTER_TURNS = {  # counter-clockwise quarter turns -> the Pillow transpose that makes them
    1: Image.Transpose.ROTATE_90,
    2: Image.Transpose.ROTATE_180,
    3: Image.Transpose.ROTATE_270,
}


class VideoReason(StrEnum):
    """Quarantine categories of videos (download failures keep the image categories: http_error...)."""

    NOT_A_VIDEO = "not_a_video"  # no container format recognised in the bytes
    NO_VIDEO_STREAM = "no_video_stream"  # e.g. an audio file
    CORRUPT = "corrupt"  # decoding failed part-way
    NO_FRAMES = "no_frames"  # a video stream without a single decodable frame
    BAD_LISTING = "bad_listing"  # a frame prefix that does not answer a JSON list of frame names
    BAD_FRAME = "bad_frame"  # a frame of a frame prefix could not be downloaded or decoded


class VideoRejected(Exception):
    """This one video cannot be used; the shard goes on without it."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = str(reason)
        self.detail = detail


@dataclass(frozen=True)
class DecodeOptions:
    fps: float = DEFAULT_FPS  # frames kept per second of video; 0 keeps every frame
    max_frames: int = DEFAULT_MAX_FRAMES  # stop decoding once this many are kept

    def __post_init__(self) -> None:
        if self.fps < 0 or self.max_frames < 1:
            raise ValueError(f"decode options need fps >= 0 and max_frames >= 1, got {self}")


@dataclass(frozen=True)
class SampledFrame:
    image: Image.Image  # upright RGB
    source_frame: int  # position among all decoded frames of the stream
    timestamp_s: float  # seconds after the first decoded frame


@dataclass(frozen=True)
class DecodeSummary:
    kept: int  # frames handed to the callback
    decoded: int  # frames decoded to get them
    capped: bool  # decoding stopped on reaching max_frames (the stream may have had more)
    rotation: int  # degrees counter-clockwise applied to make frames upright (0, 90, 180, 270)
    seconds: float  # wall time of the decode, callbacks included


def decode_video(
    source: str | Path | BinaryIO, options: DecodeOptions, on_frame: Callable[[SampledFrame], None]
) -> DecodeSummary:
    """Decode ``source`` and call ``on_frame`` with each sampled upright frame, in time order."""
    started = time.monotonic()
    try:
        container = av.open(str(source) if isinstance(source, Path) else source, mode="r")
    except av.FFmpegError as exc:
        raise VideoRejected(VideoReason.NOT_A_VIDEO, f"cannot open as a video: {_why(exc)}") from exc
    with container:
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams}) or ["none"]
            raise VideoRejected(
                VideoReason.NO_VIDEO_STREAM, f"{container.format.name}: streams {', '.join(kinds)}"
            )
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: decoding is most of the work
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        kept = decoded = 0
        rotation = 0
        first_time: float | None = None
        last_slot = -1
        capped = False
        try:
            for frame in container.decode(stream):
                source_frame = decoded
                decoded += 1
                seconds = frame.time if frame.time is not None else source_frame / float(rate)
                first_time = seconds if first_time is None else first_time
                elapsed = max(0.0, seconds - first_time)
                if options.fps > 0:
                    slot = int(elapsed * options.fps + 1e-6)
                    if slot <= last_slot:
                        continue
                    last_slot = slot
                rotation = round((frame.rotation or 0) / 90) % 4 * 90
                on_frame(SampledFrame(_upright(frame.to_image(), rotation), source_frame, elapsed))
                kept += 1
                if kept >= options.max_frames:
                    capped = True
                    break
        except av.FFmpegError as exc:
            raise VideoRejected(
                VideoReason.CORRUPT, f"decoding failed after {decoded} frames: {_why(exc)}"
            ) from exc
        if kept == 0:
            raise VideoRejected(
                VideoReason.NO_FRAMES,
                f"{container.format.name}/{stream.codec_context.name}: no frame decoded",
            )
    return DecodeSummary(kept, decoded, capped, rotation, time.monotonic() - started)


def _upright(image: Image.Image, rotation: int) -> Image.Image:
    """``image`` turned ``rotation`` degrees counter-clockwise (a multiple of 90), as RGB."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    turn = _QUARTER_TURNS.get(rotation // 90 % 4)
    return image.transpose(turn) if turn is not None else image


def _why(exc: av.FFmpegError) -> str:
    """FFmpeg's message without the file name (a temporary path says nothing to the reader)."""
    return exc.strerror or str(exc)
