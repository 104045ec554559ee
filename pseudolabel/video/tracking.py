"""Following detected objects through a video: keyframe prompts, a tracker between them, stable IDs.

Every ``keyframe_every`` frames (0, K, 2K, ...) the configured detector runs on the frame with the
chain's prompt and floors. Its boxes are matched to the live tracks (box IoU between a detection and
the bbox of the track's mask on that frame, greedy by IoU, at least ``match_iou``): a matched track
keeps its ID and is re-prompted with the fresh box; a detection matching nothing starts a new track; a
track no detection matched is carried on from its own last mask and ends once it has gone unmatched
on more than ``max_lost_keyframes`` keyframes in a row, or as soon as its mask vanishes.

Memory stays flat however long the video is: the tracker only ever sees one window of frames, the
K + 1 frames from a keyframe to the next (``stage_frames`` copies them into a scratch directory, the
layout SAM2's video predictor reads), and each frame's masks are handed to ``emit`` as COCO RLE rows
as soon as they exist. What carries over from one window to the next is one RLE mask per live track.
A track that starts on keyframe ``f > 0`` is also propagated backward through the previous window,
so an object that entered between two keyframes is labelled from (about) its first appearance.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pseudolabel.models.interfaces import Candidates, Detector
from pseudolabel.models.stages import DetectionSettings
from pseudolabel.rle import EncodedMasks, decode_rle

TRACKING_VERSION = "video_tracks/1"  # bump when the stored tracks' meaning changes


@dataclass(frozen=True)
class TrackingSettings:
    keyframe_every: int = 15  # detector keyframes every K frames; also the tracker's window (K + 1 frames)
    match_iou: float = 0.5  # a detection continues a track when box IoU with its mask's bbox >= this
    max_lost_keyframes: int = 1  # a track unmatched on more keyframes in a row than this ends
    backward: bool = True  # propagate tracks started mid-video back through the previous window

    def __post_init__(self) -> None:
        if self.keyframe_every < 1:
            raise ValueError(f"keyframe_every must be >= 1, got {self.keyframe_every}")
        if not 0.0 < self.match_iou <= 1.0:
            raise ValueError(f"match_iou must be in (0, 1], got {self.match_iou}")
        if self.max_lost_keyframes < 0:
            raise ValueError(f"max_lost_keyframes must be >= 0, got {self.max_lost_keyframes}")


@dataclass(frozen=True)
class TrackedFrame:
    """One frame's masks, as a tracker yields them: ``masks[i]`` and ``scores[i]`` belong to
    ``track_ids[i]``; masks are COCO RLE at the frame's size (possibly empty: the object is gone)."""

    frame: int  # index within the window the tracker was given
    track_ids: list[int]
    masks: EncodedMasks
    scores: np.ndarray  # (N,) float32: the tracker's confidence that the object is there


class Tracker(Protocol):
    """A video object tracker over one window of frames at a time (e.g. SAM2's video predictor).

    ``init`` opens a directory of ``000000.jpg, 000001.jpg, ...`` (the window, frame 0 first); prompts
    name frames by their index in it. ``propagate`` runs from ``start`` forward (or backward with
    ``reverse``) to the window's end, yielding every frame's masks for every prompted object, the
    prompted frame included. ``reset`` drops the window and every prompt, freeing its memory.
    """

    def describe(self) -> dict[str, Any]: ...

    def init(self, frames_dir: str) -> None: ...

    def add_box(self, frame: int, track_id: int, box: np.ndarray) -> None: ...

    def add_mask(self, frame: int, track_id: int, mask: np.ndarray) -> None: ...

    def propagate(self, start: int, *, reverse: bool = False) -> Iterator[TrackedFrame]: ...

    def reset(self) -> None: ...


@dataclass
class Track:
    track_id: int
    phrase: str
    box_score: float  # of the detection that started it
    text_score: float
    match_box_score: float  # of the detection that last re-matched it
    started_at: int
    last_frame: int = -1
    last_mask: str | None = None  # RLE on last_frame: how it is carried into the next window
    last_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # that mask's bbox, xyxy
    lost: int = 0  # keyframes in a row without a matching detection
    frames: int = 0  # rows written


@dataclass
class VideoTracks:
    """What tracking one video did (counts for the UI; the masks went to ``emit``)."""

    video_id: str
    frames: int
    keyframes: int = 0
    rows: int = 0
    started: int = 0
    ended: int = 0  # lost or vanished before the last frame
    track_lengths: list[int] = field(default_factory=list)  # frames with a mask, per track
    max_window_frames: int = 0  # most frames the tracker held at once
    detect_s: float = 0.0
    track_s: float = 0.0


# One frame's rows for ``schemas.VIDEO_TRACKS``, as column lists.
Emit = Callable[[dict[str, list]], None]


def keyframes(frames: int, every: int) -> list[int]:
    return list(range(0, frames, every))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda boxes: (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(track_boxes: np.ndarray, detection_boxes: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, highest IoU first (ties: lower indices): [(track, detection)]."""
    iou = box_iou(track_boxes, detection_boxes)
    pairs = sorted(
        (-iou[t, d], t, d) for t in range(iou.shape[0]) for d in range(iou.shape[1]) if iou[t, d] >= min_iou
    )
    used_t, used_d, out = set(), set(), []
    for _, t, d in pairs:
        if t not in used_t and d not in used_d:
            used_t.add(t)
            used_d.add(d)
            out.append((t, d))
    return out


def stage_frames(read_frame: Callable[[int], bytes], frames: Sequence[int], directory: Path) -> None:
    """Write ``frames`` (video indices) into ``directory`` as 000000.jpg.. in that order (the window)."""
    for old in directory.glob("*.jpg"):
        old.unlink()
    for local, index in enumerate(frames):
        (directory / f"{local:06d}.jpg").write_bytes(read_frame(index))


def track_video(
    video_id: str,
    frames: int,
    read_frame: Callable[[int], bytes],
    detector: Detector,
    tracker: Tracker,
    detection: DetectionSettings,
    settings: TrackingSettings,
    emit: Emit,
    scratch: str | None = None,
) -> VideoTracks:
    """Track the objects of one video of ``frames`` frames (see module docstring)."""
    result = VideoTracks(video_id, frames)
    live: dict[int, Track] = {}
    next_id = 1
    every = settings.keyframe_every
    with tempfile.TemporaryDirectory(prefix="tracking-", dir=scratch) as tmp:
        window_dir = Path(tmp)
        for f in keyframes(frames, every):
            result.keyframes += 1
            started = time.perf_counter()
            found = _detect(detector, video_id, f, read_frame(f), detection)
            result.detect_s += time.perf_counter() - started

            order = sorted(live)
            boxes = np.array([live[t].last_box for t in order], np.float32).reshape(-1, 4)
            pairs = match(boxes, found.boxes, settings.match_iou)
            matched = {order[t]: d for t, d in pairs}
            seeds: dict[int, tuple[str, Any]] = {}
            for track_id in order:
                track = live[track_id]
                if track_id in matched:
                    d = matched[track_id]
                    track.lost, track.match_box_score = 0, float(found.box_scores[d])
                    seeds[track_id] = ("box", found.boxes[d])
                else:
                    track.lost += 1
                    if track.lost > settings.max_lost_keyframes:
                        _end(result, live.pop(track_id))
                        continue
                    seeds[track_id] = ("mask", decode_rle(track.last_mask, found.height, found.width))
            new: dict[int, tuple[str, Any]] = {}
            for d in sorted(set(range(len(found))) - set(matched.values())):
                live[next_id] = Track(
                    next_id,
                    found.phrases[d],
                    float(found.box_scores[d]),
                    float(found.text_scores[d]),
                    float(found.box_scores[d]),
                    started_at=f,
                )
                new[next_id] = seeds[next_id] = ("box", found.boxes[d])
                next_id += 1
            result.started += len(new)

            started = time.perf_counter()
            if new and f > 0 and settings.backward:
                window = list(range(f - every, f + 1))
                _run_window(
                    tracker, read_frame, window_dir, window, new, live, result, emit, every, reverse=True
                )
            end = min(f + every, frames - 1)
            window = list(range(f, end + 1))
            _run_window(
                tracker, read_frame, window_dir, window, seeds, live, result, emit, every, reverse=False
            )
            result.track_s += time.perf_counter() - started
            for track_id in sorted(live):  # a mask that vanished by the window's end ends its track
                if live[track_id].last_frame < end:
                    _end(result, live.pop(track_id))
    for track_id in sorted(live):  # still followed at the last frame: not "ended"
        result.track_lengths.append(live.pop(track_id).frames)
    return result


def _run_window(
    tracker: Tracker,
    read_frame: Callable[[int], bytes],
    window_dir: Path,
    window: list[int],
    prompts: dict[int, tuple[str, Any]],
    live: dict[int, Track],
    result: VideoTracks,
    emit: Emit,
    every: int,
    *,
    reverse: bool,
) -> None:
    """Prompt ``prompts`` on the window's keyframe, propagate, emit rows. Forward: every frame but the
    window's last (the next window's keyframe re-emits it), unless it is the video's last frame; each
    track remembers its mask on the last frame. Backward: the frames before the keyframe."""
    if not prompts:
        return
    stage_frames(read_frame, window, window_dir)
    result.max_window_frames = max(result.max_window_frames, len(window))
    prompt_at = len(window) - 1 if reverse else 0
    tracker.init(str(window_dir))
    try:
        for track_id, (kind, value) in prompts.items():
            if kind == "box":
                tracker.add_box(prompt_at, track_id, np.asarray(value, np.float32))
            else:
                tracker.add_mask(prompt_at, track_id, value)
        last = len(window) - 1
        for tracked in tracker.propagate(prompt_at, reverse=reverse):
            index = window[tracked.frame]
            if reverse and tracked.frame == prompt_at:
                continue  # the forward pass emits the keyframe itself
            if not reverse and tracked.frame == last:
                _remember(tracked, live, index)
                if index != result.frames - 1:
                    continue
            rows = _rows(result.video_id, index, index % every == 0, tracked, live)
            if rows["track_id"]:
                emit(rows)
                result.rows += len(rows["track_id"])
    finally:
        tracker.reset()


def _remember(tracked: TrackedFrame, live: dict[int, Track], index: int) -> None:
    for i, track_id in enumerate(tracked.track_ids):
        track = live.get(track_id)
        if track is not None and tracked.masks.areas[i] > 0:
            x, y, w, h = (float(v) for v in tracked.masks.bboxes[i])
            track.last_frame, track.last_mask, track.last_box = (
                index,
                tracked.masks.counts[i],
                (x, y, x + w, y + h),
            )


def _rows(video_id: str, index: int, keyframe: bool, tracked: TrackedFrame, live: dict[int, Track]) -> dict:
    masks = tracked.masks
    rows: dict[str, list] = {name: [] for name in _COLUMNS}
    for i, track_id in enumerate(tracked.track_ids):
        track = live.get(track_id)
        if track is None or masks.areas[i] == 0:
            continue
        x, y, w, h = (float(v) for v in masks.bboxes[i])
        track.frames += 1
        values = (
            video_id, index, track_id, track.phrase, x, y, x + w, y + h,
            track.box_score, track.text_score, track.match_box_score, float(tracked.scores[i]),
            masks.counts[i], masks.height, masks.width, int(masks.areas[i]), keyframe,
        )  # fmt: skip
        for name, value in zip(_COLUMNS, values, strict=True):
            rows[name].append(value)
    return rows


_COLUMNS = (
    "video_id", "frame_index", "track_id", "phrase", "x0", "y0", "x1", "y1", "box_score", "text_score",
    "match_box_score", "mask_score", "rle_counts", "height", "width", "mask_area", "keyframe",
)  # fmt: skip


def _end(result: VideoTracks, track: Track) -> None:
    result.ended += 1
    result.track_lengths.append(track.frames)


def _detect(
    detector: Detector, video_id: str, index: int, data: bytes, settings: DetectionSettings
) -> Candidates:
    prepared = detector.prepare(f"{video_id}/{index:06d}", data)
    (found,) = detector.detect(
        [prepared],
        settings.captions(),
        box_floor=settings.box_floor,
        text_floor=settings.text_floor,
        max_candidates=settings.max_candidates,
    )
    return found
