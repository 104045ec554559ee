"""Which model to run, as plain data, and building it inside a model worker.

Detectors, segmenters and video trackers (:class:`TrackerSpec`, :data:`TRACKERS`) work alike.

A :class:`DetectorSpec` / :class:`SegmenterSpec` is what the orchestrator's resources hand a worker
(JSON through Dagster Pipes): backend, variant, checkpoint source and runtime knobs. This module is
importable without torch: :func:`load_detector` / :func:`load_segmenter` look the backend up in
:data:`DETECTORS` / :data:`SEGMENTERS` ("module:attribute" of a ``spec -> model`` builder) and import
it only then, so the model stack loads in the worker environment only and the fakes
(:mod:`pseudolabel.testing.models`) never load in production.

Checkpoint sources (``checkpoint``): "" = the official release URL, downloaded once into the cache
(``cache_dir``, default ``$PSEUDOLABEL_MODEL_CACHE`` or ~/.cache/pseudolabel) and verified by sha256;
a local path; an ``s3://`` URI; or "random" = untrained weights for offline smoke runs. ``tiny``
shrinks the architecture (random weights only) for tests and the offline demo.

:func:`fetch_default_checkpoints` (``pseudolabel fetch-models``, run as ``python -m
pseudolabel.models.loading`` by the CLI) runs in the model-worker environment, not the orchestrator's:
the URL and digest tables live beside the architectures they configure (``grounding_dino_build``,
``sam2_build``, which import torch), so a torch-free copy would be a second table to keep in step; the
text encoder comes through ``huggingface_hub``, which only the worker environment installs; and the
cache it fills is read by local model workers, which need that environment anyway. The cost is that a
first ``fetch-models`` builds the worker environment, as a first GPU step or ``pseudolabel demo`` does.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pseudolabel.models.checkpoints import (
    RANDOM,
    UNPINNED,
    CheckpointError,
    CheckpointNotFound,
    ResolvedCheckpoint,
    default_cache_dir,
    resolve_checkpoint,
)
from pseudolabel.models.interfaces import Detector, Segmenter
from pseudolabel.models.report import SMOKE_RUN_NOTE

if TYPE_CHECKING:
    from pseudolabel.video.tracking import Tracker

GROUNDING_DINO = "grounding_dino"
OWLV2 = "owlv2"  # transformers Owlv2ForObjectDetection (text queries; objectness + class scores)
OWLVIT = "owlvit"  # transformers OwlViTForObjectDetection (OWL-ViT v1)
DINOV2_SALIENCY = "dinov2_saliency"  # prompt-free: DINOv2 attention -> salient regions -> boxes / points
ANNOTATIONS = "annotations"  # boxes and clicks read from a COCO or JSONL file: no model
SAM3 = "sam3"  # SAM 3: text -> boxes + masks in one pass (its own worker environment, transformers >= 5)
SAM2 = "sam2"
EDGETAM = "edgetam"  # EdgeTAM through transformers: a light SAM2-style segmenter for CPU-only machines
DETECTOR_MASKS = "detector"  # segmenter backend: keep the masks the detector made (SAM 3), no model
FAKE = "fake"  # instant deterministic stand-ins (pseudolabel.testing.models): no torch, no weights
FAKE_BLOBS = "fake_blobs"  # a stand-in detector that finds the flat-coloured shapes of synthetic videos
FAKES = (FAKE, FAKE_BLOBS)
# Backend name -> "module:attribute" of its builder, called with the spec; imported when selected.
DETECTORS: dict[str, str] = {
    GROUNDING_DINO: "pseudolabel.models.grounding_dino_build:load_grounding_dino",
    OWLV2: "pseudolabel.models.owl:load_owl",
    OWLVIT: "pseudolabel.models.owl:load_owl",
    DINOV2_SALIENCY: "pseudolabel.models.dinov2_saliency:load_dinov2_saliency",
    ANNOTATIONS: "pseudolabel.models.annotations:load_annotations",
    SAM3: "pseudolabel.models.sam3:load_sam3",
    FAKE: "pseudolabel.testing.models:FakeDetector.from_spec",
    FAKE_BLOBS: "pseudolabel.testing.models:BlobDetector.from_spec",
}
SEGMENTERS: dict[str, str] = {
    SAM2: "pseudolabel.models.sam2_segmenter:load_sam2",
    EDGETAM: "pseudolabel.models.hf_sam:load_edgetam",
    DETECTOR_MASKS: "pseudolabel.models.sam3:load_detector_masks",
    FAKE: "pseudolabel.testing.models:FakeSegmenter.from_spec",
}
# Video trackers (pseudolabel.video.tracking.Tracker): SAM2's video predictor, or a colour follower.
TRACKERS: dict[str, str] = {
    SAM2: "pseudolabel.models.sam2_video:load_sam2_video",
    FAKE: "pseudolabel.testing.models:FakeTracker.from_spec",
}
GROUNDING_DINO_VARIANTS = ("swint_ogc", "swinb_cogcoor")
# Each backend's variants, the first being its default ("" selects it). Backends without variants: ("",).
VARIANTS: dict[str, tuple[str, ...]] = {
    GROUNDING_DINO: GROUNDING_DINO_VARIANTS,
    OWLV2: ("base-patch16-ensemble", "base-patch16", "large-patch14-ensemble"),
    OWLVIT: ("base-patch32", "base-patch16", "large-patch14"),
    DINOV2_SALIENCY: ("small", "base", "large", "giant"),
    ANNOTATIONS: ("",),
    SAM3: ("",),
    SAM2: ("large", "tiny", "small", "base_plus"),
    EDGETAM: ("",),
    DETECTOR_MASKS: ("",),
}
# The worker environment (an extra of pyproject.toml) a backend runs in; None = the orchestrator's own
# interpreter is enough (no torch: stand-ins, annotation files, the detector's stored masks).
WORKER_ENV, SAM3_ENV = "worker", "worker-sam3"
ENVIRONMENTS: dict[str, str | None] = {
    SAM3: SAM3_ENV,
    ANNOTATIONS: None,
    DETECTOR_MASKS: None,
    FAKE: None,
    FAKE_BLOBS: None,
}
PROMPT_MODES = ("box", "point", "box+point")
MATCH_ON = ("auto", "url", "image_id", "file_name")
TINY_RANDOM_TEXT_ENCODER = "tiny-random"  # text_encoder value: a generated 1-layer BERT (smoke runs)


class ModelConfigError(ValueError):
    """The model configuration cannot work as given; retrying will not help."""


@dataclass(frozen=True)
class _Spec:
    backend: str
    variant: str
    checkpoint: str = ""  # "" (official URL) | local path | s3://bucket/key | "random"
    checkpoint_sha256: str = ""  # expected digest; overrides the pinned table
    cache_dir: str = ""
    allow_download: bool = True
    device: str = "auto"  # auto = the (leased) CUDA device when present, else cpu
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    batch_size: int = 8
    num_workers: int = 4  # CPU threads reading + decoding + resizing images ahead of the GPU
    tiny: bool = False  # tiny random architecture (requires checkpoint="random")
    seed: int = 0  # random init seed (random weights only)
    image_size: int | None = None  # model input size; None = the model's own default
    seconds_per_image: float = 0.0  # fake backend only: simulated work (tests of concurrency, kills)
    oom_above_batch: int = 0  # fake backend only: simulate CUDA out-of-memory for larger batches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def for_retry(self, retry_number: int):
        """The spec for the ``retry_number``-th retry of a step: half the batch per retry (only CUDA
        out-of-memory errors and lost workers are retried; both suggest memory pressure)."""
        return replace(self, batch_size=max(1, self.batch_size >> retry_number)) if retry_number else self

    def __post_init__(self) -> None:
        # "" = the backend's default variant; so is the class default (e.g. DetectorSpec's "swint_ogc")
        # when it is not one of this backend's variants: DetectorSpec(backend="owlv2") needs no variant.
        variants = VARIANTS.get(self.backend, ())
        unchosen = self.variant == "" or (self.variant == type(self).variant and self.variant not in variants)
        if unchosen and variants:
            object.__setattr__(self, "variant", variants[0])

    @property
    def is_fake(self) -> bool:
        return self.backend in FAKES

    @property
    def environment(self) -> str | None:
        """The worker environment (pyproject extra) this backend runs in; None = no model stack needed."""
        return ENVIRONMENTS.get(self.backend, WORKER_ENV)

    @property
    def needs_model_stack(self) -> bool:
        """Whether running this spec needs a worker environment (torch and the model packages)."""
        return self.environment is not None

    def cache(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def validate(self, backends: dict[str, str]) -> None:
        if self.backend not in backends:
            raise ModelConfigError(f"unknown backend {self.backend!r}; one of {list(backends)}")
        variants = VARIANTS.get(self.backend, ())
        if not self.is_fake and self.variant not in variants:
            raise ModelConfigError(
                f"unknown {self.backend} variant {self.variant!r}; one of {list(variants)}"
            )
        if self.tiny and self.checkpoint != RANDOM:
            raise ModelConfigError(
                "tiny=True builds a shrunken architecture no released checkpoint fits; set checkpoint='random'"
            )
        if self.batch_size < 1:
            raise ModelConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class DetectorSpec(_Spec):
    backend: str = GROUNDING_DINO
    variant: str = "swint_ogc"
    # Local directory or hub name of the BERT text encoder (its weights are then replaced by the
    # checkpoint's). "tiny-random" generates a 1-layer random BERT in the cache (smoke runs).
    text_encoder: str = "bert-base-uncased"
    max_size: int | None = None  # input long-side cap; default 1333 (224 when tiny); image_size = short side
    max_boxes_per_caption: int = 3  # fake backend only
    compile: bool = False  # torch.compile backbone + transformer (opt-in; compiles per new input shape)
    # grounding_dino / owlv2 / owlvit: decode each batch's JPEGs on the model's device in one call (nvJPEG on
    # CUDA) and resize them there, instead of in the CPU workers (opt-in; pixels differ slightly).
    decode_on_device: bool = False
    # How regions prompt the segmenter (dinov2_saliency, annotations with boxes): "box", "point" (the
    # region's centre / the file's clicks only) or "box+point".
    prompt_mode: str = "box"
    # dinov2_saliency: the most salient regions per image, the share of the CLS attention mass kept as
    # foreground, and the smallest region as a fraction of the image.
    num_objects: int = 5
    attention_threshold: float = 0.6
    min_area: float = 0.01
    # annotations: a COCO .json or a .jsonl file (local path or s3:// URI) and which image key to match
    # on: "url", "image_id", "file_name" (the URL's last path segment) or "auto" (first that matches).
    annotations: str = ""
    match_on: str = "auto"

    def validate(self) -> None:  # type: ignore[override]
        super().validate(DETECTORS)
        if self.prompt_mode not in PROMPT_MODES:
            raise ModelConfigError(
                f"prompt_mode must be one of {list(PROMPT_MODES)}, got {self.prompt_mode!r}"
            )
        if self.backend == ANNOTATIONS and not self.annotations:
            raise ModelConfigError("the annotations backend needs `annotations`: a COCO .json or .jsonl file")
        if self.match_on not in MATCH_ON:
            raise ModelConfigError(f"match_on must be one of {list(MATCH_ON)}, got {self.match_on!r}")
        if self.decode_on_device and self.backend not in (GROUNDING_DINO, OWLV2, OWLVIT):
            raise ModelConfigError(f"decode_on_device is for grounding_dino and owl*, not {self.backend!r}")


@dataclass(frozen=True)
class SegmenterSpec(_Spec):
    backend: str = SAM2
    variant: str = "large"
    max_boxes_per_call: int = 64  # boxes per mask-decoder call

    def validate(self) -> None:  # type: ignore[override]
        super().validate(SEGMENTERS)


@dataclass(frozen=True)
class TrackerSpec(_Spec):
    """SAM2.1's video predictor (same variants and checkpoints as the segmenter) or ``"fake"``."""

    backend: str = SAM2
    variant: str = "large"
    offload_video_to_cpu: bool = True  # window frames in host memory (saves GPU memory, ~no cost)
    offload_state_to_cpu: bool = False  # tracking memory in host memory (less GPU memory, ~10 % slower)

    def validate(self) -> None:  # type: ignore[override]
        super().validate(TRACKERS)


def load_detector(spec: DetectorSpec) -> Detector:
    """Build the detector a spec describes (checkpoint fetched and verified first)."""
    spec.validate()
    return _builder(DETECTORS[spec.backend])(spec)


def load_segmenter(spec: SegmenterSpec) -> Segmenter:
    """Build the segmenter a spec describes (checkpoint fetched and verified first)."""
    spec.validate()
    return _builder(SEGMENTERS[spec.backend])(spec)


def load_tracker(spec: TrackerSpec) -> Tracker:
    """Build the video tracker a spec describes (checkpoint fetched and verified first)."""
    spec.validate()
    return _builder(TRACKERS[spec.backend])(spec)


def _builder(target: str) -> Any:
    """``"package.module:Class.method"`` -> that attribute, importing the module now."""
    module, _, attribute = target.partition(":")
    found: Any = importlib.import_module(module)
    for name in attribute.split("."):
        found = getattr(found, name)
    return found


# What Grounding DINO reads of bert-base-uncased: the hub repo also holds TF, Flax and Rust weights.
TEXT_ENCODER_FILES = ["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "*.safetensors"]


def fetch_default_checkpoints(
    cache_dir: str = "", *, text_encoder: bool = True, log: Callable[[str], object] = lambda _: None
) -> list[ResolvedCheckpoint]:
    """Download (once) and verify the default detector's and segmenter's checkpoints into the model cache
    (official URLs, ``$PSEUDOLABEL_CHECKPOINT_BASE_URL`` mirrors them); with ``text_encoder``, also
    bert-base-uncased into the Hugging Face cache (``HF_ENDPOINT`` mirrors it). Worker environment only.
    Raises :class:`~pseudolabel.models.checkpoints.CheckpointError` for a missing or mismatched file."""
    from pseudolabel.models import grounding_dino_build, sam2_build

    resolved = []
    for spec, checkpoint in (
        (DetectorSpec(cache_dir=cache_dir), grounding_dino_build.VARIANTS[DetectorSpec.variant].checkpoint),
        (SegmenterSpec(cache_dir=cache_dir), sam2_build.VARIANTS[SegmenterSpec.variant].checkpoint),
    ):
        log(f"{checkpoint.name}: {checkpoint.filename} ...")
        resolved.append(spec_checkpoint(spec, checkpoint))
    if text_encoder:
        from huggingface_hub import snapshot_download

        name = DetectorSpec.text_encoder
        log(f"text encoder: {name} (Hugging Face hub) ...")
        try:
            path = Path(snapshot_download(name, allow_patterns=TEXT_ENCODER_FILES))
        except Exception as exc:  # offline, hub errors: say what is missing and how to provide it
            raise CheckpointNotFound(
                f"Grounding DINO text encoder {name!r} could not be fetched from the Hugging Face hub "
                f"({exc!r}). Run where the hub (or HF_ENDPOINT) is reachable, or set the detector's "
                "text_encoder to a local directory holding it."
            ) from exc
        resolved.append(ResolvedCheckpoint(path, None, f"hf://{name}", UNPINNED))
    return resolved


def fetch_main() -> int:
    """``python -m pseudolabel.models.loading``: fetch the defaults, print one line per file (path,
    sha256, how it was verified) on stdout; a failure is one clear message on stderr, exit 1."""
    try:
        resolved = fetch_default_checkpoints(log=lambda line: print(line, file=sys.stderr, flush=True))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for item in resolved:
        print(f"{item.path}  sha256={item.sha256 or '-'}  {item.status}")
    return 0


def spec_checkpoint(spec: _Spec, official: Any) -> ResolvedCheckpoint:
    """The spec's checkpoint, fetched and verified; ``official`` is the variant's ``CheckpointSpec``."""
    return resolve_checkpoint(
        spec.checkpoint,
        official,
        expected_sha256=spec.checkpoint_sha256 or None,
        cache_dir=spec.cache(),
        allow_download=spec.allow_download,
    )


def spec_runtime(spec: _Spec, resolved: ResolvedCheckpoint) -> tuple[Any, str]:
    """Device and precision, refusing to run pretrained weights on a CPU nobody asked for."""
    from pseudolabel.models.runtime import resolve_device, resolve_precision

    try:
        device = resolve_device(spec.device)
        precision = resolve_precision(spec.precision, device)
    except (RuntimeError, ValueError) as exc:
        raise ModelConfigError(str(exc)) from exc
    if device.type == "cpu" and spec.device == "auto" and not resolved.is_random:
        import torch

        raise ModelConfigError(
            f"{spec.backend} with pretrained weights would run on the CPU: this worker sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}). Check the driver "
            "and the GPU lease, or set device='cpu' on the resource to accept a run many times slower."
        )
    return device, precision


def spec_identity(spec: _Spec, resolved: ResolvedCheckpoint) -> dict[str, Any]:
    """The identity entries every backend's ``describe()`` shares: backend, checkpoint, weights."""
    identity = {
        "backend": spec.backend,
        "checkpoint": resolved.source,
        "checkpoint_sha256": resolved.sha256,
        "checkpoint_status": resolved.status,
        "weights": "random" if resolved.is_random else "pretrained",
        "smoke_run": resolved.is_random,
    }
    if resolved.is_random:
        identity |= {"seed": spec.seed, "tiny": spec.tiny, "smoke_run_note": SMOKE_RUN_NOTE}
    return identity


if __name__ == "__main__":
    # Run the module proper, not this ``__main__`` copy: the builders import pseudolabel.models.loading.
    from pseudolabel.models.loading import fetch_main as _fetch_main

    sys.exit(_fetch_main())
