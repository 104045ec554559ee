"""The GPU stages over a set of images: settings, fingerprints and the batched run loops.

``detections``: images -> every candidate above deliberately low floors (0.05), stored with its
scores, so the thresholds applied downstream can move anywhere above the floors without touching
the GPU. ``masks``: every candidate -> a mask as COCO RLE, so later threshold changes select among
stored masks instead of re-running the segmenter.

Both loops read images through CPU threads that decode and resize ahead while the model runs a
batch (:func:`prefetched_batches`). Storage, provenance and reports are the worker's
(:mod:`pseudolabel.workers.shards`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import pyarrow as pa

from pseudolabel.fingerprint import fingerprint, model_identity, with_fingerprint
from pseudolabel.models.interfaces import (
    Candidates,
    Detector,
    PreparedImage,
    Segmenter,
    captions_for,
    detection_images_table,
    detections_table,
    masks_table,
)

DETECTION_VERSION = "detections/2"  # bump when the stored content's meaning changes (2: + query_index)
SEGMENTATION_VERSION = "masks/1"
# ``describe()`` entries that say how a model was run, not what it computes: a re-run or a retry that
# differs only in these (an out-of-memory retry halves the batch) would write the same content.
RUN_ONLY_IDENTITY = ("batch_size",)

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class DetectionSettings:
    prompt: str = "plant ."
    one_prompt_per_class: bool = False  # run "a . b ." as "a ." and "b ." and merge
    box_floor: float = 0.05
    text_floor: float = 0.05
    max_candidates: int = 300  # per image; images that hit it are counted in the result

    def captions(self) -> list[str]:
        return captions_for(self.prompt, self.one_prompt_per_class)


@dataclass(frozen=True)
class SegmentationSettings:
    multimask: bool = False  # 3 masks per box, keep the best predicted IoU, store all 3 scores


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    width: int
    height: int
    sha256: str = ""
    url: str = ""  # where the image came from (the annotations backend can match on it)


def ok_images(index: pa.Table) -> list[ImageRef]:
    """Rows of an IMAGE_INDEX table with status "ok", sorted by image_id."""
    rows = index.select(["image_id", "url", "width", "height", "sha256", "status"]).to_pylist()
    refs = [
        ImageRef(
            r["image_id"], int(r["width"] or 0), int(r["height"] or 0), r["sha256"] or "", r["url"] or ""
        )
        for r in rows
        if r["status"] == "ok"
    ]
    return sorted(refs, key=lambda ref: ref.image_id)


def content_identity(describe: dict[str, Any]) -> dict[str, Any]:
    """The part of a model's ``describe()`` a stage fingerprint hashes: what determines the output content
    (model, variant, weights digest, precision, input size, backend options), without how this run
    computed it: the batch size (a retry halves it) and which of the host's devices ran it ("cuda:1" ->
    "cuda"; the device type stays, as the numerics differ). Worker threads and retry counts are never in
    ``describe()``. Shards whose stored fingerprint matches are skipped, so these must not enter it."""
    identity = {k: v for k, v in model_identity(describe).items() if k not in RUN_ONLY_IDENTITY}
    if isinstance(identity.get("device"), str):
        identity["device"] = identity["device"].split(":", 1)[0]
    return identity


def detection_fingerprint(images: Sequence[ImageRef], settings: DetectionSettings, model: dict) -> str:
    """What determines a shard's detections: each image's id and content digest (from the shard's image
    index), the detection settings and the detector's :func:`content_identity`."""
    return fingerprint(
        {
            "stage": DETECTION_VERSION,
            "images": [(ref.image_id, ref.sha256) for ref in images],
            "settings": asdict(settings),
            "model": content_identity(model),
        }
    )


def segmentation_fingerprint(detections_sha256: str, settings: SegmentationSettings, model: dict) -> str:
    """What determines a shard's masks: the stored detections' bytes (which carry their own fingerprint),
    the segmentation settings and the segmenter's :func:`content_identity`."""
    return fingerprint(
        {
            "stage": SEGMENTATION_VERSION,
            "detections": detections_sha256,
            "settings": asdict(settings),
            "model": content_identity(model),
        }
    )


@dataclass(frozen=True)
class StageResult:
    """A stage's output: one :class:`Candidates` per input image (zero-candidate ones included),
    sorted by image_id; with masks after the masks stage."""

    images: list[Candidates]
    seconds: float

    @property
    def num_candidates(self) -> int:
        return sum(len(found) for found in self.images)

    @property
    def zero_candidate_images(self) -> int:
        return sum(1 for found in self.images if len(found) == 0)

    def capped_images(self, max_candidates: int) -> int:
        """Images whose candidate list was cut at max_candidates (thresholds below their last score are lossy)."""
        return sum(1 for found in self.images if len(found) >= max_candidates)

    def detections_table(self, fingerprint_value: str) -> pa.Table:
        return with_fingerprint(detections_table(self.images), fingerprint_value)

    def images_table(self, fingerprint_value: str) -> pa.Table:
        return with_fingerprint(detection_images_table(self.images), fingerprint_value)

    def masks_table(self, fingerprint_value: str) -> pa.Table:
        return with_fingerprint(masks_table(self.images), fingerprint_value)


def run_detection(
    images: Sequence[ImageRef],
    read_image: Callable[[str], bytes],
    detector: Detector,
    settings: DetectionSettings,
    *,
    workers: int = 4,
) -> StageResult:
    """Detect on every image: CPU workers read + decode + resize ahead while the model runs a batch."""
    started = time.perf_counter()
    captions = settings.captions()
    # Similar aspect ratios share a batch, so padding to the batch's largest image wastes little.
    order = sorted(images, key=lambda ref: (ref.height / ref.width if ref.width else 1.0, ref.image_id))
    found: dict[str, Candidates] = {}
    for batch in _prepared_batches(order, read_image, detector, workers):
        for result in detector.detect(
            batch,
            captions,
            box_floor=settings.box_floor,
            text_floor=settings.text_floor,
            max_candidates=settings.max_candidates,
        ):
            found[result.image_id] = result
    ordered = [found[ref.image_id] for ref in sorted(images, key=lambda ref: ref.image_id)]
    return StageResult(ordered, time.perf_counter() - started)


def run_segmentation(
    images: Sequence[Candidates],
    read_image: Callable[[str], bytes],
    segmenter: Segmenter,
    settings: SegmentationSettings,
    *,
    workers: int = 4,
) -> StageResult:
    """Segment every candidate box; zero-candidate images are not even decoded."""
    started = time.perf_counter()
    todo = sorted((found for found in images if len(found)), key=lambda found: found.image_id)
    by_id = {found.image_id: found for found in todo}

    def check(prepared: PreparedImage) -> None:
        found = by_id[prepared.image_id]
        if (prepared.width, prepared.height) != (found.width, found.height):
            # Boxes are in the detection stage's pixel frame; a different image would misplace every mask.
            raise RuntimeError(
                f"image {found.image_id} is {prepared.width}x{prepared.height} but its detections were made "
                f"on {found.width}x{found.height}; re-run detections for this shard"
            )

    segmented: dict[str, Candidates] = {}
    # A segmenter with ``submit`` (Sam2Segmenter) encodes a batch's RLE on worker threads while the
    # next batch runs on the device: collect each batch after submitting the next.
    submit = getattr(segmenter, "submit", None)
    pending = None
    for batch in _prepared_batches(todo, read_image, segmenter, workers, check):
        prompts = [by_id[item.image_id] for item in batch]
        if submit is None:
            segmented.update(
                (r.image_id, r) for r in segmenter.segment(batch, prompts, multimask=settings.multimask)
            )
            continue
        submitted = submit(batch, prompts, multimask=settings.multimask)
        if pending is not None:
            segmented.update((r.image_id, r) for r in pending.result())
        pending = submitted
    if pending is not None:
        segmented.update((r.image_id, r) for r in pending.result())
    outputs = 3 if settings.multimask else 1
    ordered = [
        segmented[found.image_id] if len(found) else found.with_no_masks(outputs)
        for found in sorted(images, key=lambda found: found.image_id)
    ]
    return StageResult(ordered, time.perf_counter() - started)


def _prepared_batches(
    items: Sequence[ImageRef] | Sequence[Candidates],
    read_image: Callable[[str], bytes],
    model: Detector | Segmenter,
    workers: int,
    check: Callable[[PreparedImage], None] | None = None,
) -> Iterator[list[PreparedImage]]:
    """``model.prepare`` on each item's image, read ahead in batches of ``model.batch_size``."""

    def load(item: ImageRef | Candidates) -> PreparedImage:
        try:
            prepared = model.prepare(item.image_id, read_image(item.image_id))
        except Exception as exc:
            raise RuntimeError(f"image {item.image_id}: {exc}") from exc
        if getattr(item, "url", ""):
            prepared = replace(prepared, url=item.url)
        if check is not None:
            check(prepared)
        return prepared

    return prefetched_batches(items, load, model.batch_size, workers)


def prefetched_batches(
    items: Sequence[T],
    load: Callable[[T], U],
    batch_size: int,
    workers: int,
    lookahead_batches: int = 2,
) -> Iterator[list[U]]:
    """Yield ``[load(item) ...]`` in batches of ``batch_size``, in input order.

    Threads suffice: JPEG decode, resize, object-store reads and CUDA kernels all release the GIL.
    At most ``(lookahead_batches + 1) * batch_size`` items are in flight, which bounds host memory.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be >= 1")
    window = (lookahead_batches + 1) * batch_size
    pending: deque[Future[U]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        try:
            next_item = 0
            while next_item < len(items) or pending:
                while next_item < len(items) and len(pending) < window:
                    pending.append(pool.submit(load, items[next_item]))
                    next_item += 1
                take = min(batch_size, len(pending))
                yield [pending.popleft().result() for _ in range(take)]
        finally:
            for future in pending:  # consumer stopped early or a load failed: drop queued work
                future.cancel()
