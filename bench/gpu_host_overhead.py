"""Host work around the models in the detections and masks stages: previous code path vs the current one.

The models are replaced by instant stand-ins (bench/host_overhead_models.py) that return correctly
shaped tensors, so what is timed is the code around them: box scaling, selection, mask upsampling +
binarisation, device->host copies, RLE. Photos are 4000x3000 (12 MP) and 640x480
(0.3 MP), with 20 and with 300 candidates per image.

    previous  = the code at git rev 5509c3d, frozen in bench/host_overhead_models.py (the per-image
                mask loop, full-image upsampling in chunks, RLE boundaries found with nonzero(); five
                .cpu() per detection batch)
    current   = pseudolabel.models (masks decoded across the batch, upsampled only where a logit can be
                positive, one copy per batch, RLE on worker threads; one copy per detection batch)

Syncs are counted with ``pseudolabel.models.runtime.counting_syncs`` (.cpu(), .item(), .tolist(),
.numpy(), bool(tensor), nonzero, stream/event synchronize, blocking host->device copies). On a
CPU-only machine the "device" is the CPU, so host ms also contains the tensor work a GPU would do
(interpolation, gathers): the ratio is then mostly the pixels no longer upsampled. Both paths run in
the same process on the same inputs. "outside ms" leaves out the time inside tensor operations AND
inside waits for the device (``.cpu()`` is an operation, ``Event.synchronize`` a wait: both paths'
waits land on the same side). Masks may differ in a few pixels between the paths on CUDA (a logit
within float rounding of 0: CUDA's ``F.interpolate`` orders its products differently); the count is
printed, and more than 1 in 100,000 pixels fails the run.

    python bench/gpu_host_overhead.py                    # both sizes, 20 and 300 candidates
    python bench/gpu_host_overhead.py --images 1 --sizes 12mp
    python bench/gpu_host_overhead.py --sizes 0.3mp --stages masks
    python bench/gpu_host_overhead.py --stages transformer   # syncs inside Grounding DINO's transformer

The "transformer" row is different: the stand-in detector above skips Grounding DINO's transformer,
so this row builds the real swint_ogc architecture at full depth (6 + 6 layers, 4 levels, 900
queries; random weights, a tiny text encoder, a small input: the count depends on none of them) and
counts the syncs of one detect call with groundingdino's own level-size readers
(``grounding_dino_patch.uninstalled``) vs the patched ones.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from host_overhead_models import (  # noqa: E402
    CAPTION,
    SAM_SIZE,
    PreviousDino,
    PreviousSegmenter,
    StandInDino,
    StandInSam2,
    box_logits,
)

from pseudolabel.models.grounding_dino import GroundingDinoDetector  # noqa: E402
from pseudolabel.models.interfaces import Candidates, PreparedImage  # noqa: E402
from pseudolabel.models.mask_upsample import BUCKET_COST  # noqa: E402
from pseudolabel.models.runtime import counting_syncs, resolve_device  # noqa: E402
from pseudolabel.models.sam2_segmenter import Sam2Segmenter  # noqa: E402

SIZES = {"0.3mp": (640, 480), "12mp": (4000, 3000)}


# ---- the measurement ------------------------------------------------------------------------------------


class TensorOps(TorchDispatchMode):
    """Counts the tensor operations run on this thread and the time spent inside them. ``kernels``
    leaves out views (no kernel on a GPU); ``calls`` counts every operation the mode saw."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = self.calls = 0
        self.seconds = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        started = time.perf_counter()
        result = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.kernels += not func.is_view
        return result


@contextlib.contextmanager
def timing_waits(ops: TensorOps) -> Iterator[None]:
    """Adds the time spent waiting for the device in CUDA stream / event / device synchronisation to
    ``ops.seconds``, as the wait inside ``.cpu()`` already is (an operation): device time never counts
    as host work, whichever way a path waits."""
    patched = [
        (torch.cuda, "synchronize"),
        (torch.cuda.Event, "synchronize"),
        (torch.cuda.Stream, "synchronize"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]

    def timed(original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                ops.seconds += time.perf_counter() - started

        return wrapper

    for owner, name, original in saved:
        setattr(owner, name, timed(original))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def mode_overhead_s(calls: int = 20000) -> float:
    """Seconds :class:`TensorOps` adds to one operation (subtracted from the instrumented runs)."""
    x = torch.zeros(1)
    best = []
    for mode in (contextlib.nullcontext, TensorOps):
        times = []
        for _ in range(3):
            with mode() as ops:
                started = time.perf_counter()
                for _ in range(calls):
                    torch.add(x, 1)
                elapsed = time.perf_counter() - started
            times.append(elapsed - (ops.seconds if ops else 0.0))
        best.append(min(times))
    return max(0.0, (best[1] - best[0]) / calls)


@dataclass(frozen=True)
class Measurement:
    ms: float  # wall ms per image, best of 3
    syncs: float  # device->host syncs per image
    kernels: float  # tensor operations other than views (kernel launches on a GPU) per image
    outside_ms: float  # ms per image outside tensor operations: Python, numpy, RLE (best of 3)
    results: list


def measure(run: Callable[[], list], images: int, emulate: bool, overhead_s: float) -> Measurement:
    """One counted run, then 3 timed runs and 3 runs timing the tensor operations; best of each."""
    with counting_syncs(emulate_device=emulate) as syncs:
        results = run()
    timings, outside, kernels = [], [], 0
    for _ in range(3):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
        with TensorOps() as ops, timing_waits(ops):
            started = time.perf_counter()
            run()
            elapsed = time.perf_counter() - started
        outside.append(elapsed - ops.seconds - ops.calls * overhead_s)
        kernels = ops.kernels
    return Measurement(
        min(timings) * 1000 / images,
        syncs.count / images,
        kernels / images,
        max(0.0, min(outside)) * 1000 / images,
        results,
    )


def batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def detection_inputs(
    width: int, height: int, images: int, device: torch.device, short: int = 800, longest: int = 1333
) -> list[PreparedImage]:
    from pseudolabel.models.grounding_dino import input_size

    w, h = input_size(width, height, short, longest)
    pixels = torch.randint(0, 255, (3, h, w), dtype=torch.uint8)
    return [PreparedImage(f"img{i}", width, height, pixels) for i in range(images)]


def mask_inputs(width: int, height: int, candidates: int, images: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prepared, found = [], []
    for i in range(images):
        size = rng.uniform(0.05, 0.5, (candidates, 2)) * [width, height]
        corner = rng.uniform(0, 1, (candidates, 2)) * ([width, height] - size)
        boxes = np.concatenate([corner, corner + size], 1).astype(np.float32)
        pixels = torch.randint(0, 255, (3, SAM_SIZE, SAM_SIZE), dtype=torch.uint8)
        prepared.append(PreparedImage(f"img{i}", width, height, pixels))
        found.append(
            Candidates(
                f"img{i}",
                width,
                height,
                boxes,
                np.ones(candidates, np.float32),
                np.ones(candidates, np.float32),
                ["plant"] * candidates,
                np.arange(candidates, dtype=np.int32),
            )
        )
    return prepared, found


def transformer_syncs(device: torch.device, images: int) -> None:
    """Syncs per image of one detect call with the real architecture, unpatched vs patched (counts only:
    the time is the model's)."""
    import tempfile

    from pseudolabel.models import tiny
    from pseudolabel.models.grounding_dino_build import build_grounding_dino
    from pseudolabel.models.grounding_dino_patch import uninstalled

    with tempfile.TemporaryDirectory() as bert:
        model = build_grounding_dino("swint_ogc", None, str(tiny.write_bert_dir(bert)))
    # 400 px short side: enough feature tokens for the 900 queries' top-k.
    detector = GroundingDinoDetector(model, device=device, batch_size=images, image_size=400, max_size=600)
    inputs = detection_inputs(600, 400, images, device, short=400, longest=600)
    detector.detect(inputs, [CAPTION])  # caption encoded outside the counts
    counts = []
    for restore in (uninstalled, contextlib.nullcontext):
        with restore(), counting_syncs(emulate_device=device.type == "cpu") as syncs:
            detector.detect(inputs, [CAPTION])
        counts.append(syncs.count / images)
    print(
        f"{'transformer':<11}{' real':<7}{'':>6} | {'-':>15} {counts[0]:>9.1f} | {'-':>14} {counts[1]:>9.1f} |"
        f" syncs only: Grounding DINO at full depth, batches of {images}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--candidates", nargs="+", type=int, default=[20, 300])
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["detections", "masks", "transformer"],
        choices=["detections", "masks", "transformer"],
    )
    parser.add_argument(
        "--gpu-plan",
        action="store_true",
        help="plan the current masks path's upsampling as on CUDA (few large buckets); on a CPU only "
        "the kernels and outside columns then mean anything",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    emulate = device.type == "cpu"
    print(
        f"device {device}; {args.images} images per row, batches of {args.batch_size}; instant stand-in models"
    )
    overhead = mode_overhead_s()
    # --gpu-plan: the current path's upsampling planned as on CUDA (few large buckets). Decoder calls
    # still hold one image each: mixing images (CUDA's default) gathers every box's image features,
    # which on a CPU costs far more than the calls it saves.
    as_on = {"bucket_cost": BUCKET_COST["cuda"]} if args.gpu_plan else {}
    print(HEADER)
    if "transformer" in args.stages:
        transformer_syncs(device, args.batch_size)
    for size in args.sizes:
        width, height = SIZES[size]
        for candidates in args.candidates:
            if "detections" in args.stages:
                inputs = detection_inputs(width, height, args.images, device)
                rows = []
                for cls in (PreviousDino, StandInDino):
                    detector = cls(device, candidates, args.batch_size)
                    run = lambda d=detector, inputs=inputs: [  # noqa: E731
                        found
                        for batch in batches(inputs, args.batch_size)
                        for found in d.detect(batch, [CAPTION])
                    ]
                    rows.append(measure(run, args.images, emulate, overhead))
                _check_same_detections(rows[0].results, rows[1].results)
                _print("detections", size, candidates, rows)
            if "masks" not in args.stages:
                continue
            prepared, found = mask_inputs(width, height, candidates, args.images)
            # The stand-in's answers per batch, made before timing (not part of the measurement).
            banks = [
                torch.cat([box_logits(c.boxes, c.width, c.height, device) for c in cands])
                for cands in batches(found, args.batch_size)
            ]
            rows = []
            for cls in (PreviousSegmenter, Sam2Segmenter):
                stand_in = StandInSam2(device, args.batch_size)
                segmenter = cls(stand_in, device=device, batch_size=args.batch_size, **as_on)

                def run(segmenter=segmenter, stand_in=stand_in, prepared=prepared, found=found, banks=banks):
                    out = []
                    for items, cands, logits in zip(
                        batches(prepared, args.batch_size),
                        batches(found, args.batch_size),
                        banks,
                        strict=True,
                    ):
                        stand_in.bank, stand_in.iou, stand_in.cursor = (
                            logits,
                            logits.new_ones(len(logits), 3),
                            0,
                        )
                        out += segmenter.segment(items, cands)
                    return out

                rows.append(measure(run, args.images, emulate, overhead))
            differ = _check_same_masks(rows[0].results, rows[1].results)
            _print("masks", size, candidates, rows)
            if differ:
                print(f"{'':<24}| {differ} mask pixels differ between the paths (logits at 0)", flush=True)


HEADER = (
    f"{'stage':<11}{'photo':<7}{'cands':>6} | {'previous ms/img':>15} {'syncs/img':>9} | "
    f"{'current ms/img':>14} {'syncs/img':>9} | {'host x less':>11} || "
    f"{'kernels/img':>11} {'outside ms/img':>14} | {'kernels/img':>11} {'outside ms/img':>14} | {'x less':>6}"
)


def _print(stage: str, size: str, candidates: int, rows: list[Measurement]) -> None:
    before, after = rows
    print(
        f"{stage:<11}{size:<7}{candidates:>6} | {before.ms:>15.1f} {before.syncs:>9.1f} | "
        f"{after.ms:>14.1f} {after.syncs:>9.1f} | {before.ms / after.ms:>10.1f}x || "
        f"{before.kernels:>11.0f} {before.outside_ms:>14.2f} | {after.kernels:>11.0f} "
        f"{after.outside_ms:>14.2f} | {before.outside_ms / max(after.outside_ms, 1e-3):>5.1f}x",
        flush=True,
    )


def _check_same_detections(before: list[Candidates], after: list[Candidates]) -> None:
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.query_indices, b.query_indices)


def _check_same_masks(before: list[Candidates], after: list[Candidates], most: float = 1e-5) -> int:
    """Mask pixels that differ between the two paths (0 on the CPU, where both interpolate alike; on
    CUDA a pixel whose logit is within float rounding of 0 may flip); fails past ``most`` of the
    pixels, or on any score difference."""
    from pseudolabel.rle import decode_rle

    differ = pixels = 0
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a.mask_scores, b.mask_scores), f"{a.image_id}: scores differ between the paths"
        pixels += len(a.masks) * a.height * a.width
        for one, two in zip(a.masks.counts, b.masks.counts, strict=True):
            if one != two:
                differ += int(
                    (decode_rle(one, a.height, a.width) != decode_rle(two, b.height, b.width)).sum()
                )
    assert differ <= most * pixels, f"{differ} of {pixels} mask pixels differ between the paths"
    return differ


if __name__ == "__main__":
    main()
