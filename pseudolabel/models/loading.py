"""Which model to run, as plain data, and building it inside a model worker.

A :class:`DetectorSpec` / :class:`SegmenterSpec` is what the orchestrator's resources hand a worker
(JSON through Dagster Pipes): backend, variant, checkpoint source and runtime knobs. This module is
importable without torch; the model stack is imported only when :func:`load_detector` /
:func:`load_segmenter` build a real backend, which happens in the worker environment.

Checkpoint sources (``checkpoint``): "" = the official release URL, downloaded once into the cache
(``cache_dir``, default ``$PSEUDOLABEL_MODEL_CACHE`` or ~/.cache/pseudolabel) and verified by sha256;
a local path; an ``s3://`` URI; or "random" = untrained weights for offline smoke runs. ``tiny``
shrinks the architecture (random weights only) for tests and the offline demo.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from pseudolabel.models.checkpoints import RANDOM, ResolvedCheckpoint, default_cache_dir, resolve_checkpoint
from pseudolabel.models.interfaces import Detector, Segmenter
from pseudolabel.models.report import SMOKE_RUN_NOTE

GROUNDING_DINO = "grounding_dino"
SAM2 = "sam2"
FAKE = "fake"  # instant deterministic stand-ins (pseudolabel.models.fakes): no torch, no weights
DETECTOR_BACKENDS = (GROUNDING_DINO, FAKE)
SEGMENTER_BACKENDS = (SAM2, FAKE)
GROUNDING_DINO_VARIANTS = ("swint_ogc", "swinb_cogcoor")
SAM2_VARIANTS = ("tiny", "small", "base_plus", "large")
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

    @property
    def is_fake(self) -> bool:
        return self.backend == FAKE

    @property
    def needs_model_stack(self) -> bool:
        """Whether running this spec needs the worker environment (torch and the model packages)."""
        return not self.is_fake

    def cache(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def validate(self, backends: tuple[str, ...], variants: tuple[str, ...]) -> None:
        if self.backend not in backends:
            raise ModelConfigError(f"unknown backend {self.backend!r}; one of {list(backends)}")
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

    def validate(self) -> None:  # type: ignore[override]
        super().validate(DETECTOR_BACKENDS, GROUNDING_DINO_VARIANTS)


@dataclass(frozen=True)
class SegmenterSpec(_Spec):
    backend: str = SAM2
    variant: str = "large"
    max_boxes_per_call: int = 64  # boxes per mask-decoder call

    def validate(self) -> None:  # type: ignore[override]
        super().validate(SEGMENTER_BACKENDS, SAM2_VARIANTS)


def load_detector(spec: DetectorSpec) -> Detector:
    """Build the detector a spec describes (checkpoint fetched and verified first)."""
    spec.validate()
    if spec.is_fake:
        from pseudolabel.models.fakes import FakeDetector

        return FakeDetector(
            batch_size=spec.batch_size,
            max_boxes_per_caption=spec.max_boxes_per_caption,
            seconds_per_image=spec.seconds_per_image,
            oom_above_batch=spec.oom_above_batch,
        )
    from pseudolabel.models import grounding_dino, grounding_dino_build, tiny

    resolved = _checkpoint(spec, grounding_dino_build.VARIANTS[spec.variant].checkpoint)
    device, precision = _runtime(spec, resolved)
    short = spec.image_size or (tiny.TINY_DINO_IMAGE_SIZE if spec.tiny else 800)
    long = spec.max_size or (tiny.TINY_DINO_MAX_SIZE if spec.tiny else 1333)
    model = grounding_dino_build.build_grounding_dino(
        spec.variant,
        resolved.path,
        _text_encoder_dir(spec),
        overrides=tiny.TINY_GROUNDING_DINO if spec.tiny else None,
        seed=spec.seed,
    )
    info = {
        "model": GROUNDING_DINO,
        "variant": spec.variant + ("-tiny" if spec.tiny else ""),
        "text_encoder": spec.text_encoder,
        **_identity(spec, resolved),
    }
    return grounding_dino.GroundingDinoDetector(
        model,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        image_size=short,
        max_size=long,
        info=info,
    )


def load_segmenter(spec: SegmenterSpec) -> Segmenter:
    """Build the segmenter a spec describes (checkpoint fetched and verified first)."""
    spec.validate()
    if spec.is_fake:
        from pseudolabel.models.fakes import FakeSegmenter

        return FakeSegmenter(
            batch_size=spec.batch_size,
            seconds_per_image=spec.seconds_per_image,
            oom_above_batch=spec.oom_above_batch,
        )
    from pseudolabel.models import sam2_segmenter, tiny

    resolved = _checkpoint(spec, sam2_segmenter.VARIANTS[spec.variant].checkpoint)
    device, precision = _runtime(spec, resolved)
    size = spec.image_size or (tiny.TINY_SAM2_IMAGE_SIZE if spec.tiny else None)
    overrides = tiny.tiny_sam2_overrides(size) if spec.tiny else []
    if spec.image_size and not spec.tiny:
        overrides.append(f"++model.image_size={spec.image_size}")
    model = sam2_segmenter.build_sam2_model(spec.variant, resolved.path, overrides=overrides, seed=spec.seed)
    info = {
        "model": "sam2.1",
        "variant": spec.variant + ("-tiny" if spec.tiny else ""),
        **_identity(spec, resolved),
    }
    return sam2_segmenter.Sam2Segmenter(
        model,
        device=device,
        precision=precision,
        batch_size=spec.batch_size,
        max_boxes_per_call=spec.max_boxes_per_call,
        info=info,
    )


def fetch_default_checkpoints(cache_dir: str = "", *, text_encoder: bool = True) -> list[Path]:
    """Download (once) and verify the default checkpoints into the model cache; with ``text_encoder``,
    also bert-base-uncased into the Hugging Face cache. Returns the local paths."""
    from pseudolabel.models import grounding_dino_build, sam2_segmenter

    paths = []
    for spec, checkpoint in (
        (DetectorSpec(cache_dir=cache_dir), grounding_dino_build.VARIANTS[DetectorSpec.variant].checkpoint),
        (SegmenterSpec(cache_dir=cache_dir), sam2_segmenter.VARIANTS[SegmenterSpec.variant].checkpoint),
    ):
        resolved = _checkpoint(spec, checkpoint)
        if resolved.path is not None:
            paths.append(resolved.path)
    if text_encoder:
        from huggingface_hub import snapshot_download

        patterns = [
            "config.json",
            "vocab.txt",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors",
        ]
        paths.append(Path(snapshot_download(DetectorSpec.text_encoder, allow_patterns=patterns)))
    return paths


def _checkpoint(spec: _Spec, official: Any) -> ResolvedCheckpoint:
    return resolve_checkpoint(
        spec.checkpoint,
        official,
        expected_sha256=spec.checkpoint_sha256 or None,
        cache_dir=spec.cache(),
        allow_download=spec.allow_download,
    )


def _runtime(spec: _Spec, resolved: ResolvedCheckpoint) -> tuple[Any, str]:
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


def _identity(spec: _Spec, resolved: ResolvedCheckpoint) -> dict[str, Any]:
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


def _text_encoder_dir(spec: DetectorSpec) -> str:
    if spec.text_encoder != TINY_RANDOM_TEXT_ENCODER:
        return spec.text_encoder
    from pseudolabel.models import tiny

    target = spec.cache() / f"tiny-random-bert-{spec.seed}"
    if not (target / "config.json").is_file():
        # Build beside the target, then rename: concurrent workers never see a half-written directory.
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tiny-bert-", dir=target.parent))
        tiny.write_bert_dir(scratch, seed=spec.seed)
        try:
            os.replace(scratch, target)
        except OSError:  # another worker got there first
            shutil.rmtree(scratch, ignore_errors=True)
    return str(target)
