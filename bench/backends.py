"""Backends side by side at SMOKE SIZES on this machine: img/s of each detector -> segmenter flow.

    python bench/backends.py                    # every flow, tiny random-weight models, 8 images of 640x480
    python bench/backends.py --full-size        # the real architectures' sizes (still random weights)
    python bench/backends.py --flows owlv2+edgetam,dinov2_saliency+sam2 --images 4
    python bench/backends.py --flows annotations+sam2,annotations+edgetam --full-size --threads 1
                                                # the light segmenter vs SAM2.1-tiny, same boxes

Every flow runs in a fresh subprocess of the interpreter its backends need (the model-worker
environment, or SAM 3's own), through the same stage loops as the assets (``run_detection``,
``run_segmentation``), after one warm-up image. Random weights: the figures are speed only and say
nothing about label quality; with tiny models they mostly measure per-image overheads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTE = "random weights: speed only, says nothing about quality"
# detector backend + segmenter backend; the annotations flow reads boxes written for the images.
FLOWS = (
    "grounding_dino+sam2",
    "owlv2+sam2",
    "owlvit+sam2",
    "owlv2+edgetam",
    "dinov2_saliency+sam2",
    "annotations+sam2",
    "annotations+edgetam",
    "sam3+detector",
)


def _images(count: int, size: tuple[int, int]) -> dict[str, bytes]:
    from PIL import Image, ImageDraw

    images = {}
    for n in range(count):
        image = Image.new("RGB", size, (30 + 20 * n % 200, 120, 60))
        draw = ImageDraw.Draw(image)
        draw.ellipse([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill=(200, 60, 40))
        draw.rectangle([size[0] // 2, size[1] // 2, size[0] - 40, size[1] - 30], fill=(40, 60, 200))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images[f"img{n:03d}"] = buffer.getvalue()
    return images


def _annotations(names: list[str], size: tuple[int, int], directory: Path) -> str:
    w, h = size
    path = directory / "boxes.jsonl"
    rows = [
        {"image": name, "boxes": [[w / 4, h / 4, w / 2, h / 2], [w / 2, h / 2, w - 40, h - 30]]}
        for name in names
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def one(flow: str, count: int, size: tuple[int, int], full_size: bool, threads: int) -> dict:
    """Run ``flow`` on ``count`` synthetic images in this process; seconds and img/s per stage."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    from pseudolabel.models.loading import DetectorSpec, SegmenterSpec, load_detector, load_segmenter
    from pseudolabel.models.stages import (
        DetectionSettings,
        ImageRef,
        SegmentationSettings,
        run_detection,
        run_segmentation,
    )

    detector_name, segmenter_name = flow.split("+")
    images = _images(count + 1, size)
    names = sorted(images)
    tiny = not full_size
    extra = {}
    with tempfile.TemporaryDirectory() as tmp:
        if detector_name == "annotations":
            extra = {"annotations": _annotations(names, size, Path(tmp)), "match_on": "image_id"}
        elif detector_name == "grounding_dino":
            from pseudolabel.models.tiny import write_bert_dir

            extra = {
                "text_encoder": "tiny-random"
                if tiny
                else str(write_bert_dir(Path(tmp) / "bert", size="base"))
            }
        detector_spec = DetectorSpec(
            backend=detector_name, checkpoint="random", tiny=tiny, device="cpu", batch_size=4, **extra
        )
        segmenter_spec = SegmenterSpec(
            backend=segmenter_name,
            variant="tiny" if segmenter_name == "sam2" else "",
            checkpoint="random",
            tiny=tiny,
            device="cpu",
            batch_size=4,
        )
        started = time.perf_counter()
        detector = load_detector(detector_spec)
        segmenter = None if segmenter_name == "detector" else load_segmenter(segmenter_spec)
        load_s = time.perf_counter() - started
        refs = [ImageRef(name, *size) for name in names]
        read = images.__getitem__
        settings = DetectionSettings(prompt="plant . flower .")
        timings = {}
        for phase, batch in (("warm-up", refs[:1]), ("timed", refs[1:])):
            t0 = time.perf_counter()
            found = run_detection(batch, read, detector, settings, workers=2).images
            t1 = time.perf_counter()
            if segmenter is not None:
                found = run_segmentation(found, read, segmenter, SegmentationSettings(), workers=2).images
            t2 = time.perf_counter()
            timings[phase] = (t1 - t0, t2 - t1, sum(len(f) for f in found))
    detect_s, segment_s, candidates = timings["timed"]
    return {
        "flow": flow,
        "load_s": round(load_s, 2),
        "detect_img_s": round(count / detect_s, 2),
        "segment_img_s": round(count / segment_s, 2) if segmenter is not None else None,
        "chain_img_s": round(count / (detect_s + segment_s), 2),
        "candidates_per_img": round(candidates / count, 1),
    }


def _interpreter(flow: str) -> str:
    from pseudolabel.models.loading import DetectorSpec, SegmenterSpec
    from pseudolabel.workers.environment import ensure_worker_python

    detector, segmenter = flow.split("+")
    needed = {DetectorSpec(backend=detector).environment, SegmenterSpec(backend=segmenter).environment} - {
        None
    }
    return (
        ensure_worker_python((needed.pop(),), log=lambda line: print(line, file=sys.stderr))
        if needed
        else sys.executable
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", default=",".join(FLOWS))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", default="640x480")
    parser.add_argument("--full-size", action="store_true", help="real architecture sizes (random weights)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one flow here, print JSON
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.one:
        print(json.dumps(one(args.one, args.images, size, args.full_size, args.threads)))
        return 0
    print(
        f"backends at {'full' if args.full_size else 'tiny'} size, {args.images} images of {args.size}, CPU ({NOTE})"
    )
    print(
        f"{'flow':<24}{'load s':>8}{'detect img/s':>14}{'segment img/s':>15}{'chain img/s':>13}{'cand/img':>10}"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = []
    for flow in args.flows.split(","):
        command = [
            _interpreter(flow),
            __file__,
            "--one",
            flow,
            "--images",
            str(args.images),
            "--size",
            args.size,
        ]
        done = subprocess.run(
            command + (["--full-size"] if args.full_size else []), env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            print(
                f"{flow:<24}failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
            )
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(row)
        segment = "-" if row["segment_img_s"] is None else f"{row['segment_img_s']:.2f}"
        print(
            f"{flow:<24}{row['load_s']:>8.1f}{row['detect_img_s']:>14.2f}{segment:>15}"
            f"{row['chain_img_s']:>13.2f}{row['candidates_per_img']:>10.1f}"
        )
    if results:
        baseline = results[0]
        print(
            f"chain img/s relative to {baseline['flow']}: "
            + ", ".join(f"{r['flow']} x{r['chain_img_s'] / baseline['chain_img_s']:.2f}" for r in results[1:])
        )
    print(NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
