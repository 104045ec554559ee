"""Video benchmark at SMOKE SIZES: decode frames/s, tracking frames/s, and peak memory against video
length (it must stay flat: the tracker only ever holds one keyframe window).

    python bench/video.py                                  # decode + fake tracker, 50/200/800 frames
    python bench/video.py --sam2                           # + tiny random-weight SAM2 (worker interpreter)

Each (tracker, length) runs in a fresh subprocess so its peak RSS is its own. Frames are synthetic
(``pseudolabel.testing.videos``), rendered and JPEG-encoded on demand (that cost is reported apart).
Smoke sizes, random weights: this says nothing about tracking quality, only about the code path's
throughput and memory shape on this machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = (320, 240)
LENGTHS = (50, 200, 800)
NOTE = "smoke sizes, random weights: says nothing about quality"


def _frame_reader(frames: int):
    from pseudolabel.testing.videos import render_frame

    def read(index: int) -> bytes:
        buffer = io.BytesIO()
        render_frame(index, frames=frames, size=SIZE).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    return read


def one(tracker_name: str, frames: int, keyframe_every: int) -> dict:
    """Track one synthetic video of ``frames`` frames in this process; peak RSS in MB."""
    from pseudolabel.models.loading import TrackerSpec, load_tracker
    from pseudolabel.models.stages import DetectionSettings
    from pseudolabel.testing.models import BlobDetector
    from pseudolabel.video.tracking import TrackingSettings, track_video

    spec = (
        TrackerSpec(backend="fake")
        if tracker_name == "fake"
        else TrackerSpec(checkpoint="random", tiny=True, variant="tiny", device="cpu")
    )
    tracker = load_tracker(spec)
    read = _frame_reader(frames)
    started = time.perf_counter()
    for i in range(min(frames, 50)):
        read(i)
    render_s = (time.perf_counter() - started) / min(frames, 50)
    rows = []
    tracemalloc.start()
    started = time.perf_counter()
    summary = track_video(
        "bench",
        frames,
        read,
        BlobDetector(),
        tracker,
        DetectionSettings(),
        TrackingSettings(keyframe_every=keyframe_every),
        lambda batch: rows.append(len(batch["track_id"])),  # count only: rows go to storage in production
    )
    seconds = time.perf_counter() - started
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "tracker": tracker_name,
        "frames": frames,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 2),
        "render_ms_per_frame": round(1000 * render_s, 2),
        "tracks": summary.started,
        "rows": sum(rows),
        "max_window_frames": summary.max_window_frames,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_traced_mb": round(traced_peak / 2**20, 2),  # Python + numpy allocations while tracking
    }


def decode_rate(frames: int) -> dict:
    from pseudolabel.testing.videos import synthetic_video
    from pseudolabel.video.decode import DecodeOptions, decode_video

    data = synthetic_video(None, frames=frames, fps=25, size=SIZE)
    kept = []
    summary = decode_video(
        io.BytesIO(data), DecodeOptions(fps=0, max_frames=frames), lambda f: kept.append(1)
    )
    return {
        "frames": summary.kept,
        "seconds": round(summary.seconds, 3),
        "frames_per_s": round(summary.kept / summary.seconds, 1),
    }


def worker_python() -> str | None:
    """The test worker environment if built, else the plain one; None when neither is."""
    for extras in (["--extra", "worker", "--extra", "worker-test"], ["--extra", "worker"]):
        try:
            out = subprocess.run(
                [sys.executable, "-m", "dagster_project.cli", "workers", "python", *extras],
                capture_output=True, text=True, cwd=REPO, timeout=60,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        path = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
        if path and Path(path).exists():
            return path
    return None


def run_child(python: str, tracker: str, frames: int, keyframe_every: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [python, __file__, "--one", tracker, str(frames), "--keyframe-every", str(keyframe_every)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one", nargs=2, metavar=("TRACKER", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--keyframe-every", type=int, default=15)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--sam2", action="store_true", help="also the tiny random SAM2 (worker environment)")
    parser.add_argument("--sam2-lengths", type=int, nargs="+", default=[20, 80])
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.keyframe_every)))
        return 0

    print(f"video bench at {SIZE[0]}x{SIZE[1]}, keyframe_every={args.keyframe_every} ({NOTE})")
    for frames in args.lengths:
        print(f"decode  {json.dumps(decode_rate(frames))}")
    runs = [("fake", sys.executable, args.lengths)]
    if args.sam2:
        python = worker_python()
        if python is None:
            print("sam2: no worker environment (pseudolabel workers install --extra worker); skipped")
        else:
            runs.append(("sam2", python, args.sam2_lengths))
    for tracker, python, lengths in runs:
        results = [run_child(python, tracker, frames, args.keyframe_every) for frames in lengths]
        for result in results:
            print(f"track   {json.dumps(result)}")
        first, last = results[0], results[-1]
        print(
            f"{tracker}: {last['frames'] / first['frames']:.0f}x the frames -> peak RSS x"
            f"{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}, traced peak x"
            f"{last['peak_traced_mb'] / max(first['peak_traced_mb'], 1e-6):.2f}, "
            f"frames/s x{last['frames_per_s'] / first['frames_per_s']:.2f}"
            f" (window {last['max_window_frames']} frames; {NOTE})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
