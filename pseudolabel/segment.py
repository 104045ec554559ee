"""``pseudolabel segment``: prompt and segment a few images from the command line, with the assets' code.

    pseudolabel segment photo.jpg more/*.jpg --prompt "tree ." --out out/        # text -> boxes -> masks
    pseudolabel segment photo.jpg --auto --out out/                             # DINOv2 saliency, no prompt
    pseudolabel segment photo.jpg --boxes boxes.json --polygons --out out/      # COCO / JSONL boxes -> masks
    pseudolabel segment photo.jpg --points clicks.jsonl --out out/              # clicks (+ boxes) -> masks

The images go through the same code as the assets: EXIF-upright normalisation, the detector and
segmenter backends (``--detector``, ``--segmenter``; :mod:`pseudolabel.models.loading`), the stage loops
(:mod:`pseudolabel.models.stages`) and, for detector candidates, the label thresholds (the packaged
``thresholds.yaml`` or ``--thresholds``; prompts from a file are all kept). ``pseudolabel segment``
(dagster_project/cli.py) runs this module in the backends' model-worker environment. Per image
``NAME``, in ``--out``:

    NAME_masks/mask_000.png     one kept object: 0/255 mask at the upright image's size
    NAME_masks/mask_000.json    its box, scores, prompt (phrase, clicks), backends (+ polygons)
    NAME_visualization.jpg      original | prompts (over the attention map with --auto) | masks
    NAME_summary.json           counts, rejects by reason, thresholds, backend identities, timings

``--random-weights`` builds the real architectures at tiny size with random weights: a SMOKE RUN that
works offline and says nothing about quality; every output is labelled so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pseudolabel.images.normalize import NormalizeOptions, normalize_image
from pseudolabel.models.checkpoints import CheckpointError
from pseudolabel.models.interfaces import Candidates, detection_images_table, detections_table, masks_table
from pseudolabel.models.loading import (
    ANNOTATIONS,
    DETECTOR_MASKS,
    DETECTORS,
    DINOV2_SALIENCY,
    GROUNDING_DINO,
    SAM2,
    SAM3,
    SEGMENTERS,
    TINY_RANDOM_TEXT_ENCODER,
    DetectorSpec,
    ModelConfigError,
    SegmenterSpec,
    load_detector,
    load_segmenter,
)
from pseudolabel.models.report import SMOKE_RUN_NOTE
from pseudolabel.models.stages import (
    DetectionSettings,
    ImageRef,
    SegmentationSettings,
    run_detection,
    run_segmentation,
)

TEXT_DETECTORS = tuple(name for name in DETECTORS if name not in (DINOV2_SALIENCY, ANNOTATIONS))
SMOKE_TITLE = "SMOKE RUN: random weights"


@dataclass(frozen=True)
class SegmentRequest:
    images: list[Path]
    out: Path
    detector: DetectorSpec
    segmenter: SegmenterSpec
    detection: DetectionSettings
    segmentation: SegmentationSettings
    thresholds: Path | None  # None: keep every candidate (prompts from a file, or --all-candidates)
    polygons: bool = False
    max_side: int = 0
    chunk: int = 16  # images detected + segmented + written together (bounds memory)
    notes: list[str] = field(default_factory=list)

    @property
    def smoke_run(self) -> bool:
        return "random" in (self.detector.checkpoint, self.segmenter.checkpoint)

    @property
    def environment(self) -> str | None:
        """The one worker environment both backends run in (None: the current interpreter will do)."""
        needed = {self.detector.environment, self.segmenter.environment} - {None}
        if len(needed) > 1:
            raise ModelConfigError(
                f"detector {self.detector.backend} and segmenter {self.segmenter.backend} need different "
                f"worker environments ({', '.join(sorted(needed))}); with --detector sam3 use --segmenter detector"
            )
        return needed.pop() if needed else None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="pseudolabel segment", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files (any format Pillow reads)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help='text prompt, classes separated by " ." (e.g. "tree . bush .")')
    source.add_argument(
        "--auto", action="store_true", help="prompt-free: salient objects from DINOv2 attention"
    )
    source.add_argument("--boxes", type=Path, metavar="FILE", help="boxes from a COCO .json or .jsonl file")
    source.add_argument(
        "--points", type=Path, metavar="FILE", help="clicks (and boxes) from a .jsonl/.json file"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--detector", help=f"with --prompt: {', '.join(TEXT_DETECTORS)} (default {GROUNDING_DINO})"
    )
    parser.add_argument("--segmenter", help=f"{', '.join(SEGMENTERS)} (default {SAM2}; {SAM3} keeps its own)")
    parser.add_argument("--detector-variant", default="", help="e.g. swinb_cogcoor, large-patch14-ensemble")
    parser.add_argument("--segmenter-variant", default="", help="e.g. tiny, small, base_plus, large")
    parser.add_argument("--detector-checkpoint", default="", help="local path, s3:// URI; default official")
    parser.add_argument("--segmenter-checkpoint", default="", help="local path, s3:// URI; default official")
    parser.add_argument("--random-weights", action="store_true", help="tiny random models: offline SMOKE RUN")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda:N")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-mode", choices=("box", "point", "box+point"), help="how regions prompt SAM")
    parser.add_argument("--num-objects", type=int, help="--auto: regions per image (default 5)")
    parser.add_argument("--attention-threshold", type=float, help="--auto: attention mass kept (default 0.6)")
    parser.add_argument(
        "--min-area", type=float, help="--auto: smallest region, image fraction (default 0.01)"
    )
    parser.add_argument(
        "--match-on", default="auto", help="annotation key: auto | url | image_id | file_name"
    )
    parser.add_argument("--box-floor", type=float, default=DetectionSettings.box_floor)
    parser.add_argument("--max-candidates", type=int, default=DetectionSettings.max_candidates)
    parser.add_argument("--multimask", action="store_true", help="3 masks per prompt, keep the best")
    parser.add_argument("--thresholds", type=Path, help="label thresholds YAML (default: the packaged one)")
    parser.add_argument("--all-candidates", action="store_true", help="write every candidate, no thresholds")
    parser.add_argument("--polygons", action="store_true", help="add COCO polygons to each mask's JSON")
    parser.add_argument("--max-side", type=int, default=0, help="downscale longer sides above this (0: no)")
    return parser


def request_from_args(args: argparse.Namespace) -> SegmentRequest:
    """The specs and settings the arguments ask for; :class:`ModelConfigError` for what cannot work."""
    notes: list[str] = []
    detector_fields: dict[str, Any] = {
        "variant": args.detector_variant,
        "checkpoint": args.detector_checkpoint,
    }
    from_file = args.boxes or args.points
    if args.prompt is not None:
        backend = args.detector or GROUNDING_DINO
        if backend not in TEXT_DETECTORS:
            raise ModelConfigError(
                f"--prompt needs a text detector ({', '.join(TEXT_DETECTORS)}), not {backend!r}"
            )
    elif args.auto:
        backend = DINOV2_SALIENCY
        notes.append("prompt-free (--auto): the text prompt is not used")
    else:
        backend = ANNOTATIONS
        detector_fields |= {
            "annotations": str(from_file),
            "match_on": args.match_on,
            "prompt_mode": "box+point" if args.points else "box",
        }
    if args.detector and args.detector != backend:
        raise ModelConfigError(
            f"--detector {args.detector} does not go with {'--auto' if args.auto else 'a file'}"
        )
    for name in ("prompt_mode", "num_objects", "attention_threshold", "min_area"):
        if (value := getattr(args, name)) is not None:
            detector_fields[name] = value
    segmenter_backend = args.segmenter or (DETECTOR_MASKS if backend == SAM3 else SAM2)
    segmenter_fields: dict[str, Any] = {
        "variant": args.segmenter_variant,
        "checkpoint": args.segmenter_checkpoint,
    }
    if args.random_weights:
        detector_fields |= {"checkpoint": "random", "tiny": True, "text_encoder": TINY_RANDOM_TEXT_ENCODER}
        segmenter_fields |= {"checkpoint": "random", "tiny": True}
        if segmenter_backend == SAM2 and not args.segmenter_variant:
            segmenter_fields["variant"] = "tiny"
    common = {"device": args.device, "batch_size": args.batch_size}
    detector = DetectorSpec(backend=backend, **common, **detector_fields)
    segmenter = SegmenterSpec(backend=segmenter_backend, **common, **segmenter_fields)
    detector.validate()
    segmenter.validate()
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        raise ModelConfigError(f"no such image file: {', '.join(missing)}")
    # Prompts from a file are the user's own; prompt-free regions are already limited by num_objects and
    # min_area, and the packaged thresholds are calibrated for Grounding DINO's scores: keep them all
    # unless a thresholds file is named.
    keep_all = args.all_candidates or ((bool(from_file) or args.auto) and args.thresholds is None)
    if keep_all and not args.all_candidates:
        notes.append(
            f"{'prompts from a file' if from_file else 'prompt-free regions'}: every mask is kept (no thresholds)"
        )
    thresholds = None
    if not keep_all:
        from pseudolabel.labels.thresholds import thresholds_path

        thresholds = args.thresholds or thresholds_path()
    return SegmentRequest(
        images=list(args.images),
        out=args.out,
        detector=detector,
        segmenter=segmenter,
        detection=DetectionSettings(
            prompt=args.prompt or "object .", box_floor=args.box_floor, max_candidates=args.max_candidates
        ),
        segmentation=SegmentationSettings(multimask=args.multimask),
        thresholds=thresholds,
        polygons=args.polygons,
        max_side=args.max_side,
        notes=notes,
    )


# ---- running ---------------------------------------------------------------------------------------


@dataclass
class _Image:
    name: str  # unique output name (file stem, numbered when two files share one)
    path: Path
    jpeg: bytes  # upright RGB JPEG, what the models read
    width: int
    height: int
    orientation: int


class _KeepingMaps:
    """A detector with ``detect_with_maps`` (DINOv2 saliency) whose maps are kept for the picture."""

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.batch_size = detector.batch_size
        self.maps: dict[str, np.ndarray] = {}

    def describe(self) -> dict[str, Any]:
        return self.detector.describe()

    def prepare(self, image_id: str, data: bytes) -> Any:
        return self.detector.prepare(image_id, data)

    def detect(self, batch: Sequence[Any], captions: Sequence[str], **floors: Any) -> list[Candidates]:
        found, maps = self.detector.detect_with_maps(batch, captions, **floors)
        self.maps.update((item.image_id, heat) for item, heat in zip(found, maps, strict=True))
        return found


def run(request: SegmentRequest, progress: Callable[[str], object] = print) -> list[dict[str, Any]]:
    """Segment every image of ``request``; returns each image's summary (also written as JSON)."""
    started = time.perf_counter()
    request.out.mkdir(parents=True, exist_ok=True)
    if request.smoke_run:
        progress(f"*** {SMOKE_TITLE}. {SMOKE_RUN_NOTE}")
    for note in request.notes:
        progress(f"note: {note}")
    loaded = time.perf_counter()
    detector = load_detector(request.detector)
    if hasattr(detector, "detect_with_maps"):
        detector = _KeepingMaps(detector)
    segmenter = None if request.segmenter.backend == DETECTOR_MASKS else load_segmenter(request.segmenter)
    identities = {
        "detector": detector.describe(),
        "segmenter": segmenter.describe() if segmenter else {"backend": DETECTOR_MASKS},
    }
    progress(
        f"models loaded in {time.perf_counter() - loaded:.1f}s: {request.detector.backend} + {request.segmenter.backend}"
    )
    thresholds = None
    if request.thresholds is not None:
        from pseudolabel.labels.thresholds import load_thresholds

        thresholds = load_thresholds(request.thresholds)
    names = _unique_names(request.images)
    summaries: list[dict[str, Any]] = []
    total = len(request.images)
    pairs = list(zip(request.images, names, strict=True))
    for first in range(0, total, request.chunk):
        chunk = [_load(path, name, request.max_side) for path, name in pairs[first : first + request.chunk]]
        by_id = {image.name: image for image in chunk}
        refs = [ImageRef(image.name, image.width, image.height, url=str(image.path)) for image in chunk]
        read = by_id_reader(by_id)
        t0 = time.perf_counter()
        detected = run_detection(refs, read, detector, request.detection, workers=2).images
        t1 = time.perf_counter()
        if segmenter is None:
            if any(found.masks is None for found in detected):
                raise ModelConfigError(
                    f"segmenter 'detector' needs a detector that makes masks (sam3), not {request.detector.backend}"
                )
            segmented = detected
        else:
            segmented = run_segmentation(detected, read, segmenter, request.segmentation, workers=2).images
        t2 = time.perf_counter()
        decisions = _decisions(segmented, thresholds)
        results = {found.image_id: found for found in segmented}
        for image in chunk:  # in the order given
            found = results[image.name]
            maps = detector.maps if isinstance(detector, _KeepingMaps) else {}
            summary = _write_image(request, image, found, decisions, maps.get(found.image_id), identities)
            summary["seconds"] = {
                "detect_batch": round(t1 - t0, 3),
                "segment_batch": round(t2 - t1, 3),
            }
            _write_json(request.out / f"{image.name}_summary.json", summary)
            summaries.append(summary)
            progress(
                f"[{len(summaries)}/{total}] {image.path}: {summary['candidates']} candidates, "
                f"{summary['kept']} kept -> {request.out / (image.name + '_visualization.jpg')}"
            )
    elapsed = time.perf_counter() - started
    progress(f"done: {total} images in {elapsed:.1f}s ({total / elapsed:.2f} img/s) -> {request.out}")
    return summaries


def by_id_reader(images: dict[str, _Image]) -> Callable[[str], bytes]:
    return lambda image_id: images[image_id].jpeg


def _unique_names(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


def _load(path: Path, name: str, max_side: int) -> _Image:
    normalized = normalize_image(path.read_bytes(), NormalizeOptions(max_side=max_side))
    return _Image(
        name, path, normalized.jpeg, normalized.width, normalized.height, normalized.original_orientation
    )


def _decisions(items: Sequence[Candidates], thresholds: Any) -> dict[tuple[str, int], str]:
    """(image_id, candidate_id) -> "kept" or the reject reason, by the assets' label decision."""
    if thresholds is None:
        return {(found.image_id, i): "kept" for found in items for i in range(len(found))}
    from pseudolabel.labels.relabel import relabel_shard

    result = relabel_shard(
        detections_table(items).to_pandas(),
        masks_table(items).to_pandas(),
        thresholds,
        detection_images_table(items).to_pandas(),
    )
    frame = result.candidates
    return {
        (image_id, int(candidate)): str(decision)
        for image_id, candidate, decision in zip(
            frame["image_id"], frame["candidate_id"], frame["decision"], strict=True
        )
    }


def _write_image(
    request: SegmentRequest,
    image: _Image,
    found: Candidates,
    decisions: dict[tuple[str, int], str],
    heat: np.ndarray | None,
    identities: dict[str, Any],
) -> dict[str, Any]:
    from pseudolabel.preview import three_panels
    from pseudolabel.rle import decode_rle, polygons, rle_object

    kept = [i for i in range(len(found)) if decisions.get((found.image_id, i)) == "kept"]
    mask_dir = request.out / f"{image.name}_masks"
    if mask_dir.exists():  # a re-run must not leave masks of the previous one
        for old in mask_dir.glob("mask_*"):
            old.unlink()
    mask_dir.mkdir(exist_ok=True)
    written = []
    for n, i in enumerate(kept):
        counts = found.masks.counts[i]
        mask = decode_rle(counts, found.height, found.width)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"mask_{n:03d}.png")
        record = {
            "mask": f"mask_{n:03d}.png",
            "candidate_id": i,
            "box": [round(float(v), 2) for v in found.boxes[i]],
            "scores": {
                "box_score": _number(found.box_scores[i]),
                "text_score": _number(found.text_scores[i]),
                "mask_score": _number(found.mask_scores[i]),
            },
            "area": int(found.masks.areas[i]),
            "mask_bbox_xywh": [float(v) for v in found.masks.bboxes[i]],
            "prompt": _prompt(found, i, request),
            "backends": identities,
            "smoke_run": request.smoke_run,
        }
        if request.polygons:
            record["polygons"] = polygons(rle_object(counts, found.height, found.width))
        _write_json(mask_dir / f"mask_{n:03d}.json", record)
        written.append(record["mask"])
    clicks = found.take(np.asarray(kept, np.int64)) if kept else None
    titles = ("original", "prompts / attention" if heat is not None else "prompts", f"masks ({len(kept)})")
    if request.smoke_run:
        titles = (f"original - {SMOKE_TITLE}", *titles[1:])
    picture = three_panels(
        image.jpeg,
        found.boxes[kept],
        [found.phrases[i] for i in kept],
        [found.masks.counts[i] for i in kept],
        found.height,
        found.width,
        points=None if clicks is None else clicks.points,
        point_labels=None if clicks is None else clicks.point_labels,
        heat=heat,
        titles=titles,
    )
    (request.out / f"{image.name}_visualization.jpg").write_bytes(picture)
    rejected: dict[str, int] = {}
    for i in range(len(found)):
        decision = decisions.get((found.image_id, i), "kept")
        if decision != "kept":
            rejected[decision] = rejected.get(decision, 0) + 1
    return {
        "image": str(image.path),
        "width": image.width,
        "height": image.height,
        "exif_orientation": image.orientation,
        "prompt": request.detection.prompt if request.detector.backend in TEXT_DETECTORS else None,
        "candidates": len(found),
        "kept": len(kept),
        "rejected": rejected,
        "thresholds": str(request.thresholds) if request.thresholds else "not applied (every candidate kept)",
        "masks": [f"{mask_dir.name}/{name}" for name in written],
        "visualization": f"{image.name}_visualization.jpg",
        "backends": identities,
        "smoke_run": request.smoke_run,
        **({"smoke_run_note": SMOKE_RUN_NOTE} if request.smoke_run else {}),
    }


def _prompt(found: Candidates, i: int, request: SegmentRequest) -> dict[str, Any]:
    prompt: dict[str, Any] = {"phrase": found.phrases[i], "box": bool(found.box_prompts()[i])}
    if found.points is not None:
        real = found.point_labels[i] >= 0
        prompt["points"] = found.points[i][real].tolist()
        prompt["point_labels"] = found.point_labels[i][real].tolist()
    if request.detector.backend in TEXT_DETECTORS:
        prompt["text"] = request.detection.prompt
    return prompt


def _number(value: float) -> float | None:
    return None if value is None or math.isnan(float(value)) else round(float(value), 5)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        request = request_from_args(args)
        run(request, progress=lambda line: print(line, flush=True))
    except (ModelConfigError, CheckpointError) as exc:  # what the user must fix: no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
